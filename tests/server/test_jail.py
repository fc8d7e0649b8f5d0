"""Tests for the served-root jail and per-caller write rights (smartserve.server.jail)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from io import BytesIO

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from breezy import errors, urlutils
from breezy.bzr.smart import request as smart_request
from breezy.bzr.smart.server import SmartTCPServer
from breezy.controldir import ControlDir
from breezy.transport import FileExists, NoSuchFile, get_transport

from smartserve.server.jail import OutsideRoot, Writable, backing_transport

SECRET = b"outside the root"


@pytest.fixture(autouse=True)
def brz_home(tmp_path_factory, monkeypatch):
    """Keep Breezy's configuration and caches out of the real home directory."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("BRZ_HOME", str(home))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("BRZ_EMAIL", "Test <test@example.com>")


@pytest.fixture
def layout(tmp_path):
    """A served root beside a secret directory, with symlinks leading in and out."""
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(SECRET)
    (root / "public").write_bytes(b"public")
    (root / "~alice").mkdir()
    (root / "~alice" / "deep").mkdir()
    (root / "file-out").symlink_to(outside / "secret")
    (root / "dir-out").symlink_to(outside)
    (root / "~alice" / "deep" / "up-out").symlink_to("../../../outside")
    (root / "dangling-out").symlink_to(outside / "new-file")
    (root / "file-in").symlink_to("public")
    (root / "dir-in").symlink_to("~alice")
    return root, outside


def snapshot(path):
    """Return every path and file content below ``path``, symlinks not followed."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            if os.path.isfile(full) and not os.path.islink(full):
                with open(full, "rb") as f:
                    found[full] = f.read()
            else:
                found[full] = None
    return found


@pytest.mark.parametrize(
    "relpath",
    [
        "../outside/secret",
        "../../outside/secret",
        "/../outside/secret",
        "~alice/../../outside/secret",
        "%2e%2e/outside/secret",
        "%2E%2E%2Foutside%2Fsecret",
        "..%2foutside/secret",
    ],
)
def test_backing_transport_dotdot_stays_in_root(layout, relpath):
    """Paths that climb above the root stop at the root and never read outside it."""
    root, _ = layout
    transport = backing_transport(root, Writable.everywhere())
    with pytest.raises(NoSuchFile):
        transport.get_bytes(relpath)


def test_backing_transport_absolute_path_is_under_root(layout):
    """An absolute path names a file below the root, not on the server's disk."""
    root, outside = layout
    transport = backing_transport(root, Writable.everywhere())
    assert transport.get_bytes("/public") == b"public"
    with pytest.raises(NoSuchFile):
        transport.get_bytes(str(outside / "secret"))


def test_backing_transport_clone_dotdot_stops_at_root(layout):
    """Cloning upwards from the root stays at the root."""
    root, _ = layout
    transport = backing_transport(root, Writable.everywhere()).clone("../..")
    assert transport.get_bytes("public") == b"public"


@pytest.mark.parametrize(
    "relpath",
    ["file-out", "dir-out/secret", "~alice/deep/up-out/secret", "%66ile-out"],
)
def test_backing_transport_symlink_out_refused_for_reads(layout, relpath):
    """Reading through a file or directory symlink that leaves the root raises PermissionDenied."""
    root, _ = layout
    transport = backing_transport(root, Writable.everywhere())
    for read in (
        transport.get,
        transport.get_bytes,
        transport.has,
        transport.stat,
        transport.lock_read,
        lambda p: list(transport.readv(p, [(0, 3)])),
    ):
        with pytest.raises(OutsideRoot) as raised:
            read(relpath)
        assert isinstance(raised.value, errors.PermissionDenied)


def test_backing_transport_symlink_dir_out_refused_for_listing_and_clone(layout):
    """Listing or cloning into a directory symlink that leaves the root is refused."""
    root, _ = layout
    transport = backing_transport(root, Writable.everywhere())
    with pytest.raises(OutsideRoot):
        transport.list_dir("dir-out")
    with pytest.raises(OutsideRoot):
        transport.clone("dir-out")
    with pytest.raises(OutsideRoot):
        transport.clone("~alice/deep").list_dir("up-out")


def test_backing_transport_symlink_out_refused_for_writes(layout, tmp_path):
    """Writing through a symlink that leaves the root (even a dangling one) changes nothing outside."""
    root, outside = layout
    transport = backing_transport(root, Writable.everywhere())
    before = snapshot(tmp_path)
    attempts = [
        lambda: transport.put_bytes("file-out", b"x"),
        lambda: transport.put_bytes("dangling-out", b"x"),
        lambda: transport.put_bytes("dir-out/new", b"x"),
        lambda: transport.append_bytes("file-out", b"x"),
        lambda: transport.mkdir("dir-out/sub"),
        lambda: transport.delete("dir-out/secret"),
        lambda: transport.rename("public", "dir-out/stolen"),
        lambda: transport.copy("public", "dir-out/copied"),
        lambda: transport.put_bytes_non_atomic("dir-out/n", b"x"),
        lambda: transport.open_write_stream("dangling-out"),
    ]
    for attempt in attempts:
        with pytest.raises(OutsideRoot):
            attempt()
    assert snapshot(tmp_path) == before
    assert not (outside / "new-file").exists()


def test_backing_transport_symlinks_inside_allowed(layout):
    """Symlinks that stay inside the root work for reading and writing."""
    root, _ = layout
    transport = backing_transport(root, Writable.everywhere())
    assert transport.get_bytes("file-in") == b"public"
    transport.put_bytes("dir-in/via-link", b"hello")
    assert (root / "~alice" / "via-link").read_bytes() == b"hello"
    assert "via-link" in transport.list_dir("dir-in")


def test_backing_transport_iter_files_recursive_skips_escapes(layout):
    """Recursive listing includes files inside the root and nothing reached through escaping links."""
    root, _ = layout
    transport = backing_transport(root, Writable.everywhere())
    files = set(transport.iter_files_recursive())
    assert "public" in files
    assert "file-in" in files
    assert not any("secret" in name for name in files)
    assert "file-out" not in files


def write_attempts(transport, target):
    """Return every kind of write aimed at the client path ``target``."""
    return {
        "put_bytes": lambda: transport.put_bytes(target, b"x"),
        "put_file": lambda: transport.put_file(target, BytesIO(b"x")),
        "put_bytes_non_atomic": lambda: transport.put_bytes_non_atomic(
            target, b"x", create_parent_dir=True
        ),
        "put_file_non_atomic": lambda: transport.put_file_non_atomic(
            target, BytesIO(b"x"), create_parent_dir=True
        ),
        "append_bytes": lambda: transport.append_bytes(target, b"x"),
        "append_file": lambda: transport.append_file(target, BytesIO(b"x")),
        "mkdir": lambda: transport.mkdir(target),
        "rmdir": lambda: transport.rmdir("/~bob/empty"),
        "delete": lambda: transport.delete("/public"),
        "delete_tree": lambda: transport.delete_tree("/~bob"),
        "rename_in": lambda: transport.rename("/~alice/mine", target),
        "rename_out": lambda: transport.rename("/public", "/~alice/taken"),
        "move_in": lambda: transport.move("/~alice/mine", target),
        "move_out": lambda: transport.move("/public", "/~alice/taken"),
        "copy": lambda: transport.copy("/public", target),
        "copy_tree": lambda: transport.copy_tree("/~alice", target),
        "copy_to": lambda: transport.clone("/~alice").copy_to(
            ["mine"], transport.clone("/~bob")
        ),
        "open_write_stream": lambda: transport.open_write_stream(target),
        "lock_write": lambda: transport.lock_write("/public"),
        "create_prefix": lambda: transport.clone(target + "/a/b").create_prefix(),
    }


OUTSIDE_TARGETS = ["/~bob/x", "/x", "/~alice/../~bob/x", "~alice/%2e%2e/~bob/x", "/~alicex/y"]
FIXED_PATH_KINDS = {"rmdir", "delete", "delete_tree", "rename_out", "move_out", "lock_write", "copy_to"}


@pytest.mark.parametrize(
    "kind, target",
    [(kind, "/x") for kind in sorted(FIXED_PATH_KINDS)]
    + [
        (kind, target)
        for kind in sorted(set(write_attempts(None, "/x")) - FIXED_PATH_KINDS)
        for target in OUTSIDE_TARGETS
    ],
)
def test_backing_transport_write_outside_prefix_refused(tmp_path, kind, target):
    """A write outside the caller's prefixes raises the readonly error and changes nothing on disk."""
    root = tmp_path / "root"
    (root / "~bob" / "empty").mkdir(parents=True)
    (root / "~alice").mkdir()
    (root / "~alice" / "mine").write_bytes(b"mine")
    (root / "public").write_bytes(b"public")
    transport = backing_transport(root, Writable.under("/~alice/"))
    before = snapshot(tmp_path)
    with pytest.raises(errors.TransportNotPossible) as raised:
        write_attempts(transport, target)[kind]()
    assert raised.value.msg == "readonly transport"
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("relpath", ["", "/", "..", "%2e%2e", "~alice/.."])
def test_backing_transport_root_itself_is_never_replaced_or_removed(tmp_path, relpath):
    """A caller who may write everywhere still cannot put a file in place of the root (whose temporary file
    would be written beside the root, outside it), remove the root or move it; making it says it exists."""
    root = tmp_path / "root"
    root.mkdir()
    transport = backing_transport(root, Writable.everywhere())
    attempts = [
        lambda: transport.put_bytes(relpath, b"x"),
        lambda: transport.put_file(relpath, BytesIO(b"x")),
        lambda: transport.put_bytes_non_atomic(relpath, b"x", create_parent_dir=True),
        lambda: transport.append_bytes(relpath, b"x"),
        lambda: transport.open_write_stream(relpath),
        lambda: transport.copy("public", relpath),
        lambda: transport.rmdir(relpath),
        lambda: transport.delete(relpath),
        lambda: transport.delete_tree(relpath),
        lambda: transport.rename(relpath, "moved"),
        lambda: transport.move(relpath, "moved"),
        lambda: transport.lock_write(relpath),
    ]
    (root / "public").write_bytes(b"public")
    for attempt in attempts:
        with pytest.raises(errors.PermissionDenied) as raised:
            attempt()
        assert raised.value.path == "/"
    (root / "public").unlink()
    for attempt in attempts[6:]:
        with pytest.raises(errors.PermissionDenied):
            attempt()
    with pytest.raises(FileExists):
        transport.mkdir(relpath)
    assert os.listdir(tmp_path) == ["root"]
    assert os.listdir(root) == []


def test_backing_transport_request_handler_refuses_put_and_rmdir_of_the_root(tmp_path):
    """Breezy's put and rmdir verbs on the root answer PermissionDenied and touch nothing, as the root is not the
    client's to replace or remove."""
    root = tmp_path / "root"
    root.mkdir()
    transport = backing_transport(root, Writable.everywhere())
    put = run_request(transport, (b"put", b"/", b""), body=b"data")
    rmdir = run_request(transport, (b"rmdir", b""))
    for response in (put, rmdir):
        assert response.args == (b"PermissionDenied", b"/", b"the served root itself")
    assert os.listdir(tmp_path) == ["root"]


def test_backing_transport_write_inside_prefix_allowed(tmp_path):
    """The caller may create its prefix directory and write anywhere below it or another granted prefix."""
    root = tmp_path / "root"
    (root / "team").mkdir(parents=True)
    transport = backing_transport(root, Writable.under("/~alice/", "/team/"))
    assert not transport.is_readonly()
    transport.mkdir("~alice")
    transport.put_bytes("/~alice/a", b"a")
    transport.append_bytes("~alice/a", b"b")
    transport.put_bytes_non_atomic("/~alice/new/b", b"b", create_parent_dir=True)
    transport.rename("~alice/a", "~alice/c")
    transport.copy("~alice/c", "team/d")
    transport.clone("team").put_bytes("e", b"e")
    with transport.open_write_stream("/team/f") as stream:
        stream.write(b"f")
    transport.delete("team/d")
    assert (root / "~alice" / "c").read_bytes() == b"ab"
    assert (root / "~alice" / "new" / "b").read_bytes() == b"b"
    assert sorted(os.listdir(root / "team")) == ["e", "f"]


def test_backing_transport_parent_creation_needs_rights(tmp_path):
    """A non-atomic put does not create a missing parent directory outside the caller's prefixes."""
    root = tmp_path / "root"
    root.mkdir()
    transport = backing_transport(root, Writable.under("/team/sub/"))
    with pytest.raises(NoSuchFile):
        transport.put_bytes_non_atomic("/team/sub", b"x", create_parent_dir=True)
    assert os.listdir(root) == []


def test_backing_transport_unknown_url_refused():
    """A jail URL whose caller is unknown does not open."""
    with pytest.raises(errors.PathError):
        get_transport("smartserve-jail-0123456789abcdef:///")


def test_backing_transport_atomic_put_needs_writable_parent(tmp_path):
    """An atomic put of the prefix itself is refused, as its temporary file would land outside the prefix."""
    (tmp_path / "~alice").mkdir()
    transport = backing_transport(tmp_path, Writable.under("/~alice/"))
    before = snapshot(tmp_path)
    with pytest.raises(errors.TransportNotPossible):
        transport.put_bytes("/~alice", b"x")
    with pytest.raises(errors.TransportNotPossible):
        transport.copy("/~alice/../other", "/~alice")
    assert snapshot(tmp_path) == before


def test_backing_transport_copy_onto_directory_does_not_follow_links(layout):
    """Copying onto a directory fails rather than writing through a symlink inside it."""
    root, outside = layout
    (root / "~alice" / "public").symlink_to(outside / "secret")
    transport = backing_transport(root, Writable.everywhere())
    with pytest.raises((errors.PathError, errors.TransportError)):
        transport.copy("public", "~alice")
    assert (outside / "secret").read_bytes() == SECRET


def test_backing_transport_nul_in_path_refused(tmp_path):
    """A path holding an escaped NUL byte is an invalid URL, not an operating-system error."""
    transport = backing_transport(tmp_path, Writable.everywhere())
    with pytest.raises(urlutils.InvalidURL):
        transport.get_bytes("a%00b")


@pytest.mark.parametrize("relpath", ["a/" * 2048 + "x", "%61/" * 2049, "b" * 13000])
def test_backing_transport_path_longer_than_path_max_refused(tmp_path, relpath):
    """A path over PATH_MAX characters, escaped or not, is an invalid URL, whatever the operation.

    Found wrong: a ``has`` of ``a/a/a/...`` cost time in the square of its
    depth on the reactor thread; 80 KB of path stalled every client 6 s.
    """
    transport = backing_transport(tmp_path, Writable.everywhere())
    for operation in (transport.has, transport.stat, transport.get_bytes, transport.clone, transport.mkdir):
        with pytest.raises(urlutils.InvalidURL, match="path longer than 4096 characters"):
            operation(relpath)
    with pytest.raises(urlutils.InvalidURL):
        get_transport(transport.abspath("x") + "/" + relpath)
    assert os.listdir(tmp_path) == []


def test_backing_transport_path_of_path_max_characters_works(tmp_path):
    """The limit refuses nothing a file system could open: a path of exactly PATH_MAX characters is looked up."""
    transport = backing_transport(tmp_path, Writable.everywhere())
    transport.mkdir("d")
    relpath = "d/" + "/".join(["n" * 200] * 20)
    relpath += "x" * (4096 - len(relpath))
    assert len(relpath) == 4096
    assert transport.has(relpath) is False


def test_backing_transport_parse_cache_keeps_only_short_paths(tmp_path):
    """A client's long paths are not remembered: the parse cache holds short paths only, a bounded number."""
    from smartserve.server import jail

    transport = backing_transport(tmp_path, Writable.everywhere())
    before = jail._parse_cached.cache_info().currsize
    for index in range(20):
        transport.has(f"{index}/" + "p" * 3000)
    assert jail._parse_cached.cache_info().currsize == before
    transport.has("short")
    assert jail._parse_cached.cache_info().currsize == before + 1


@given(st.lists(st.sampled_from("abc"), max_size=40), st.integers(min_value=0, max_value=40))
def test_deepest_checked_finds_the_longest_checked_prefix(names, checked_depth):
    """For any path and any prefix-closed set of checked paths, the walk starts below the deepest checked prefix."""
    from smartserve.server.jail import _deepest_checked

    segments = tuple(names)
    checked_depth = min(checked_depth, max(len(segments) - 1, 0))
    checked = {segments[:depth] for depth in range(1, checked_depth + 1)}
    checked |= {("other",) + segments[:depth] for depth in range(len(segments))}
    assert _deepest_checked(segments, checked) == checked_depth


def test_backing_transport_drops_setuid_setgid_and_world_write_from_client_modes(tmp_path):
    """Files never become setuid, setgid, sticky or writable by others whatever mode a client asks; group write stays,
    and a directory may be setgid (Breezy asks it of a group-shared repository).

    Found wrong: ``put`` with mode 06777 made ``-rwsrwsrwx``, owned by the server's account.
    """
    transport = backing_transport(tmp_path, Writable.everywhere())
    transport.put_bytes("put", b"x", mode=0o6777)
    transport.put_file("put-file", BytesIO(b"x"), mode=0o4755)
    transport.put_bytes_non_atomic("non-atomic/f", b"x", mode=0o4755, create_parent_dir=True, dir_mode=0o7777)
    transport.append_bytes("append", b"x", mode=0o4777)
    transport.put_bytes("group", b"x", mode=0o664)
    transport.mkdir("dir", mode=0o7777)
    modes = {path.name: path.stat().st_mode & 0o7777 for path in tmp_path.rglob("*")}
    assert modes == {
        "put": 0o775,
        "put-file": 0o755,
        "non-atomic": 0o2775,
        "f": 0o755,
        "append": 0o775,
        "group": 0o664,
        "dir": 0o2775,
    }


def test_backing_transport_readv_of_a_directory_is_a_read_error(tmp_path):
    """``readv`` of a directory fails as ``get`` of it does, with ReadError, not an AttributeError in the server."""
    transport = backing_transport(tmp_path, Writable.everywhere())
    transport.mkdir("d")
    with pytest.raises(errors.ReadError):
        list(transport.readv("d", [(0, 1)]))


def test_backing_transport_url_through_symlink_out_refused(layout):
    """Reopening a URL that resolves outside the root through a symlink is refused."""
    root, _ = layout
    transport = backing_transport(root, Writable.everywhere())
    with pytest.raises(OutsideRoot):
        get_transport(transport.abspath("dir-out"))


def test_backing_transport_callers_are_independent(tmp_path):
    """Two callers on one root keep their own rights, also when their URLs are reopened."""
    (tmp_path / "~alice").mkdir()
    alice = backing_transport(tmp_path, Writable.under("/~alice/"))
    reader = backing_transport(tmp_path, Writable.nowhere())
    assert alice.base != reader.base
    get_transport(alice.base).put_bytes("~alice/a", b"a")
    reopened = get_transport(reader.base)
    assert reopened.is_readonly()
    with pytest.raises(errors.TransportNotPossible):
        reopened.put_bytes("~alice/b", b"b")
    assert os.listdir(tmp_path / "~alice") == ["a"]


def test_backing_transport_read_only_caller(layout, tmp_path):
    """A caller with Writable.nowhere() is read-only: it can read, and every write is refused."""
    root, _ = layout
    transport = backing_transport(root, Writable.nowhere())
    assert transport.is_readonly()
    assert transport.get_bytes("public") == b"public"
    before = snapshot(tmp_path)
    for attempt in write_attempts(transport, "/~alice/x").values():
        with pytest.raises((errors.TransportNotPossible, NoSuchFile)) as raised:
            attempt()
        if isinstance(raised.value, errors.TransportNotPossible):
            assert raised.value.msg == "readonly transport"
    assert snapshot(tmp_path) == before


def test_backing_transport_clone_keeps_restrictions(tmp_path):
    """Clones, and transports reopened from their URLs, keep the caller's rights."""
    root = tmp_path / "root"
    (root / "~alice").mkdir(parents=True)
    (root / "~bob").mkdir()
    transport = backing_transport(root, Writable.under("/~alice/"))
    alice = transport.clone("~alice")
    alice.put_bytes("ok", b"ok")
    for clone in (alice.clone(".."), alice.clone("../~bob"), get_transport(alice.base)):
        with pytest.raises(errors.TransportNotPossible):
            clone.put_bytes("/~bob/no", b"no")
    reopened = get_transport(transport.external_url()).clone("~alice")
    reopened.put_bytes("again", b"again")
    assert sorted(os.listdir(root / "~alice")) == ["again", "ok"]
    assert os.listdir(root / "~bob") == []


def test_backing_transport_local_abspath_refused(tmp_path):
    """No local path is handed out, so Breezy cannot bypass the checks with direct file access."""
    transport = backing_transport(tmp_path, Writable.everywhere())
    with pytest.raises(errors.NotLocalUrl):
        transport.local_abspath("x")


def test_backing_transport_errors_name_client_paths(tmp_path):
    """Path errors name the client path, not where the root lives on the server."""
    transport = backing_transport(tmp_path, Writable.everywhere())
    with pytest.raises(NoSuchFile) as raised:
        transport.get_bytes("missing/file")
    assert raised.value.path == "/missing/file"
    assert str(tmp_path) not in str(raised.value)


LONG_NAME = "n" * 300


@pytest.mark.parametrize(
    "args, body",
    [
        pytest.param((b"get", LONG_NAME.encode()), None, id="get-long"),
        pytest.param((b"stat", LONG_NAME.encode()), None, id="stat-long"),
        pytest.param((b"list_dir", LONG_NAME.encode()), None, id="list_dir-long"),
        pytest.param((b"mkdir", LONG_NAME.encode(), b""), None, id="mkdir-long"),
        pytest.param((b"put", LONG_NAME.encode(), b""), b"data", id="put-long"),
        pytest.param((b"put", b"dir", b""), b"data", id="put-directory"),
        pytest.param((b"append", b"dir", b""), b"data", id="append-directory"),
        pytest.param((b"delete", b"dir"), None, id="delete-directory"),
        pytest.param((b"rename", b"public", b"dir"), None, id="rename-onto-directory"),
        pytest.param((b"move", b"public", b"dir"), None, id="move-onto-directory"),
        pytest.param((b"move", b"public", LONG_NAME.encode()), None, id="move-long"),
        pytest.param((b"readv", LONG_NAME.encode()), b"0,1", id="readv-long"),
    ],
)
def test_backing_transport_operating_system_errors_hide_the_root(tmp_path, args, body):
    """Errors LocalTransport reports without a path of its own (a name too long, a directory in the way) name
    the client path, not where the root lives on the server's disk."""
    root = tmp_path / "root"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "file").write_bytes(b"file")
    (root / "public").write_bytes(b"public")
    response = run_request(backing_transport(root, Writable.everywhere()), args, body)
    assert not response.is_successful()
    assert not any(str(tmp_path).encode() in arg for arg in response.args if isinstance(arg, bytes)), response.args
    assert response.args[:2] == (b"error", b"TransportError")
    assert response.args[2].startswith(b"Transport error: /")


def test_writable_prefix_matching():
    """Prefix matching is by whole path segments after normalisation."""
    writable = Writable.under("/~alice/", "/team")
    assert writable.allows("/~alice")
    assert writable.allows("/~alice/repo/.bzr")
    assert writable.allows("/team/x")
    assert not writable.allows("/~alicex/repo")
    assert not writable.allows("/~alice/../~bob/x")
    assert not writable.allows("/")
    assert Writable.everywhere().allows("/anything")
    assert not Writable.nowhere().allows("/anything")
    assert Writable.under() == Writable.nowhere()
    assert Writable.under("/team/", "/") == Writable.everywhere()
    assert Writable.under("/a/", "/a") == Writable.under("/a")
    with pytest.raises(ValueError):
        Writable.under("~alice")
    with pytest.raises(ValueError):
        Writable.under("/~alice/../")


def make_branch(path):
    """Create a standalone branch with one commit at ``path``; return its last revision id."""
    branch = ControlDir.create_branch_convenience(str(path), force_new_tree=True)
    tree = branch.controldir.open_workingtree()
    (path / "hello").write_text("hello\n")
    tree.add(["hello"])
    return tree.commit("first", committer="Test <test@example.com>")


def test_backing_transport_opens_real_branch(tmp_path):
    """Breezy opens a branch through the jailed transport and reads its last revision."""
    root = tmp_path / "root"
    (root / "~alice").mkdir(parents=True)
    revid = make_branch(root / "~alice" / "trunk")
    transport = backing_transport(root, Writable.nowhere())
    controldir = ControlDir.open_from_transport(transport.clone("~alice/trunk"))
    branch = controldir.open_branch()
    assert branch.last_revision() == revid
    assert branch.repository.has_revision(revid)


def run_request(transport, args, body=None):
    """Run one request through Breezy's own server-side request handler; return its response."""
    handler = smart_request.SmartServerRequestHandler(
        transport, smart_request.request_handlers, "/"
    )
    handler.args_received(args)
    if body is not None:
        handler.accept_body(body)
        handler.end_of_body()
    return handler.response


def test_backing_transport_request_handler_translates_refusals(layout, tmp_path):
    """Breezy's request handler answers a symlink escape with PermissionDenied and a refused put with ReadOnlyError."""
    root, _ = layout
    transport = backing_transport(root, Writable.under("/~alice/"))
    escape = run_request(transport, (b"get", b"/file-out"))
    assert not escape.is_successful()
    assert escape.args == (
        b"PermissionDenied",
        b"/file-out",
        b"outside the served root",
    )
    before = snapshot(tmp_path)
    refused = run_request(transport, (b"put", b"/~bob/x", b""), body=b"data")
    assert not refused.is_successful()
    assert refused.args == (b"ReadOnlyError",)
    assert snapshot(tmp_path) == before
    allowed = run_request(transport, (b"put", b"/~alice/x", b""), body=b"data")
    assert allowed.is_successful()
    assert (root / "~alice" / "x").read_bytes() == b"data"


def test_backing_transport_request_handler_opens_branch(tmp_path):
    """Breezy's smart verbs open a branch on the jailed transport and report its tip."""
    root = tmp_path / "root"
    root.mkdir()
    revid = make_branch(root / "trunk")
    transport = backing_transport(root, Writable.nowhere())
    opened = run_request(transport, (b"BzrDir.open_branchV3", b"trunk/"))
    assert opened.is_successful(), opened.args
    assert opened.args[0] == b"branch"
    info = run_request(transport, (b"Branch.last_revision_info", b"trunk/"))
    assert info.args == (b"ok", b"1", revid)


def test_backing_transport_is_cheap(tmp_path):
    """Building a transport per caller takes well under a millisecond."""
    backing_transport(tmp_path, Writable.everywhere())
    count = 2000
    started = time.perf_counter()
    for _ in range(count):
        backing_transport(tmp_path, Writable.under("/~alice/"))
    assert (time.perf_counter() - started) / count < 0.0002


BRZ = os.path.join(os.path.dirname(sys.executable), "brz")


@pytest.fixture
def smart_server():
    """Serve a jailed transport with Breezy's own TCP smart server on 127.0.0.1; yield a starter."""
    servers = []

    def start(transport):
        server = SmartTCPServer(transport, client_timeout=30)
        server.start_server("127.0.0.1", 0)
        server.start_background_thread()
        servers.append(server)
        return f"bzr://127.0.0.1:{server.port}"

    yield start
    for server in servers:
        server.stop_background_thread()


def run_brz(*args, cwd):
    """Run the real ``brz`` command line; return the finished process."""
    return subprocess.run(
        [BRZ, *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


@pytest.mark.skipif(not os.path.exists(BRZ), reason="no brz command line")
def test_backing_transport_real_brz_push_and_branch(tmp_path, smart_server):
    """A real brz client pushes into its own namespace, is refused elsewhere, and cannot branch through an escaping symlink."""
    root = tmp_path / "root"
    (root / "~bob").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    make_branch(tmp_path / "outside" / "hidden")
    (root / "dir-out").symlink_to(tmp_path / "outside")
    revid = make_branch(tmp_path / "src")
    url = smart_server(backing_transport(root, Writable.under("/~alice/")))

    pushed = run_brz(
        "push", "--create-prefix", "-d", "src", url + "/~alice/trunk", cwd=tmp_path
    )
    assert pushed.returncode == 0, pushed.stderr
    branch = ControlDir.open(str(root / "~alice" / "trunk")).open_branch()
    assert branch.last_revision() == revid

    for target in ("/~bob/trunk", "/~alice/../~bob/trunk", "/~alice/%2e%2e/~bob/t"):
        refused = run_brz("push", "-d", "src", url + target, cwd=tmp_path)
        assert refused.returncode == 3
        assert "readonly transport" in refused.stderr
    assert os.listdir(root / "~bob") == []

    escaped = run_brz("branch", url + "/dir-out/hidden", "copy", cwd=tmp_path)
    assert escaped.returncode == 3
    assert 'Permission denied: "/dir-out/hidden": outside the served root' in (
        escaped.stderr
    )
    assert not (tmp_path / "copy").exists()


PATH_PIECES = [
    "..", ".", "", "%2e%2e", "%2E%2e", "%2f", "%2F", "~alice", "~alicex", "~bob",
    "file-out", "dir-out", "dangling-out", "deep", "up-out", "secret", "new",
]


@given(
    pieces=st.lists(st.sampled_from(PATH_PIECES), min_size=1, max_size=8),
    absolute=st.booleans(),
    start=st.sampled_from([".", "~alice", "~alice/deep", "~bob"]),
)
@settings(max_examples=300, deadline=None)
def test_backing_transport_no_path_escapes(tmp_path_factory, pieces, absolute, start):
    """No combination of dot-dot, escapes and symlinks reads the secret or writes outside the caller's prefix."""
    base = tmp_path_factory.mktemp("fuzz")
    root = base / "root"
    outside = base / "outside"
    (root / "~alice" / "deep").mkdir(parents=True)
    (root / "~bob").mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(SECRET)
    (root / "file-out").symlink_to(outside / "secret")
    (root / "dir-out").symlink_to(outside)
    (root / "dangling-out").symlink_to(outside / "new")
    (root / "~alice" / "deep" / "up-out").symlink_to("../../../outside")
    before = snapshot(base)
    relpath = ("/" if absolute else "") + "/".join(pieces)
    transport = backing_transport(root, Writable.under("/~alice/")).clone(start)
    try:
        assert transport.get_bytes(relpath) != SECRET
    except (errors.PathError, errors.TransportError):
        pass
    try:
        transport.put_bytes(relpath, b"written")
    except (errors.PathError, errors.TransportError):
        # LocalTransport leaves its temporary file behind when the final
        # rename fails; it must still be in the caller's namespace.
        for leftover in set(snapshot(base)) - set(before):
            assert leftover.startswith(str(root / "~alice") + os.sep)
            os.remove(leftover)
        assert snapshot(base) == before
    else:
        changed = set(snapshot(base)) - set(before)
        assert len(changed) == 1
        (written,) = changed
        assert written.startswith(str(root / "~alice") + os.sep)


def test_backing_transport_client_rename_forgets_checked_directories(layout):
    """After a client moves a directory away and a relative symlink into its place, a path through it is checked afresh and refused."""
    root, outside = layout
    (root / "top").mkdir()
    (root / "top" / "file").write_bytes(b"top file")
    (root / "~alice" / "deep" / "rel").symlink_to("..")
    transport = backing_transport(root, Writable.everywhere())
    assert transport.get_bytes("top/file") == b"top file"
    transport.rename("top", "top-old")
    transport.rename("~alice/deep/rel", "top")
    with pytest.raises(OutsideRoot):
        transport.get_bytes("top/outside/secret")


@pytest.mark.parametrize(
    "replaced, target, read", [("top", "", "top/secret"), ("top/file", "secret", "top/file")], ids=["directory", "file"]
)
def test_backing_transport_operator_symlink_seen_by_next_request(layout, replaced, target, read):
    """A directory or file the operator replaces with a symlink out of the root is refused from the next request on."""
    root, outside = layout
    (root / "top").mkdir()
    (root / "top" / "file").write_bytes(b"top file")
    transport = backing_transport(root, Writable.nowhere())
    assert transport.file_size("top/file") == len(b"top file")
    assert transport.get_bytes("top/file") == b"top file"
    (root / replaced).rename(root / f"{replaced}-old")
    (root / replaced).symlink_to(outside / target)
    transport.forget_checked()
    assert transport.file_size(read) is None
    with pytest.raises(OutsideRoot):
        transport.get_bytes(read)


def test_backing_transport_client_delete_forgets_checked_files(layout):
    """After a client deletes a file, a symlink out of the root put at its place is refused within the same request."""
    root, outside = layout
    (root / "top").mkdir()
    (root / "top" / "file").write_bytes(b"top file")
    transport = backing_transport(root, Writable.everywhere())
    assert transport.get_bytes("top/file") == b"top file"
    transport.delete("top/file")
    (root / "top" / "file").symlink_to(outside / "secret")
    with pytest.raises(OutsideRoot):
        transport.get_bytes("top/file")


def test_backing_transport_get_sees_what_an_open_write_stream_wrote(tmp_path):
    """While a write stream is open, get flushes it first, as LocalTransport does."""
    transport = backing_transport(tmp_path, Writable.everywhere())
    stream = transport.open_write_stream("log")
    try:
        stream.write(b"written, not yet closed")
        assert transport.get_bytes("log") == b"written, not yet closed"
    finally:
        stream.close()
    assert transport.get_bytes("log") == b"written, not yet closed"


def test_backing_transport_get_errors_as_local_transport(layout):
    """A missing file, and a directory (whose error comes on reading), fail as with Breezy's LocalTransport."""
    root, outside = layout
    transport = backing_transport(root, Writable.nowhere())
    with pytest.raises(NoSuchFile) as missing:
        transport.get("missing/file")
    assert missing.value.path == "/missing/file"
    late = transport.get("~alice")
    with pytest.raises(errors.ReadError):
        late.read()
    with pytest.raises(errors.ReadError):
        transport.get_bytes("~alice")
    with pytest.raises(NoSuchFile):
        transport.get_bytes("missing")


def test_backing_transport_get_bytes_reads_whole_files(tmp_path):
    """get_bytes returns every byte of files empty, small, around its first read's size, and large."""
    content = {"empty": b"", "small": b"s" * 1000, "large": bytes(range(256)) * 4000}
    content.update({f"around-{size}": b"r" * size for size in (65535, 65536, 65537)})
    for name, data in content.items():
        (tmp_path / name).write_bytes(data)
    transport = backing_transport(tmp_path, Writable.nowhere())
    for name, data in content.items():
        assert transport.get_bytes(name) == data
        assert transport.get(name).read() == data


def test_backing_transport_file_size_only_for_readable_files_inside(layout):
    """file_size gives a regular file's size, and None for a directory, a missing path or a symlink out of the root."""
    root, outside = layout
    transport = backing_transport(root, Writable.nowhere())
    assert transport.file_size("public") == len(b"public")
    assert transport.file_size("/file-in") == len(b"public")
    assert transport.file_size("~alice") is None
    assert transport.file_size("missing") is None
    assert transport.file_size("file-out") is None
    assert transport.file_size("../outside/secret") is None
