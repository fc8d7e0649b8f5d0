"""The per-verb idempotency table, shared by the server and the client.

Every verb has exactly one class, which says what happens if a request is
run twice because the client could not tell whether the first one ran:

read
    No effect on the server. Running it again is always fine.
idem
    Idempotent write: the end state is the same however often it runs
    (``put`` writes the same bytes; ``set_last_revision_info`` sets the same
    tip).
semi
    Not idempotent, but repeating it does no harm: the repeat may fail.
    ``lock_write`` taken twice fails the second time with LockContention,
    and ``unlock`` of a lock already released fails with TokenMismatch;
    the caller is no worse off than after a dropped connection.
semivfs
    A destructive VFS operation (``delete``, ``rename``, ``mkdir``...): the
    repeat fails or, worse, acts on a file that took the old one's place.
mutate
    Repeating it corrupts: ``append`` adds the same bytes twice.
stream
    The request body is a one-shot stream that was consumed while sending
    (``insert_stream``); there is nothing left to send again.

A verb missing from the table is ``mutate``: when in doubt, never resend.
The classes equal Breezy's own ``request_handlers`` registry for every verb
Breezy knows; a test keeps the two from drifting apart.

``may_resend`` answers the client's question "may I send this request
again?" from the verb's class and from how far the failed attempt got.
"""

from __future__ import annotations

import enum
from typing import Mapping, NamedTuple

__all__ = [
    "VerbClass",
    "VerbInfo",
    "FailurePoint",
    "TABLE",
    "classify",
    "describe",
    "may_resend",
]


class VerbClass(enum.Enum):
    """How safe a verb is to run twice; ``.value`` is Breezy's word for it."""

    READ = "read"
    IDEM = "idem"
    SEMI = "semi"
    SEMIVFS = "semivfs"
    MUTATE = "mutate"
    STREAM = "stream"


class VerbInfo(NamedTuple):
    """A verb's class, and why it has it where that is not obvious."""

    verb_class: VerbClass
    why: str = ""


R, I, S, V, M, T = (
    VerbClass.READ,
    VerbClass.IDEM,
    VerbClass.SEMI,
    VerbClass.SEMIVFS,
    VerbClass.MUTATE,
    VerbClass.STREAM,
)

_LOCK = "a second lock attempt fails with LockContention; no harm done"
_UNLOCK = "a second unlock fails with TokenMismatch; no harm done"
_CREATE = "a second attempt fails because it already exists"
_DESTROY = "a second attempt fails because it is already gone"
_SETS = "sets a value; the same value twice is the same state"

TABLE: Mapping[bytes, VerbInfo] = {
    # Transport-level (VFS) verbs.
    b"hello": VerbInfo(R),
    b"get": VerbInfo(R),
    b"has": VerbInfo(R),
    b"stat": VerbInfo(R),
    b"list_dir": VerbInfo(R),
    b"readv": VerbInfo(R),
    b"iter_files_recursive": VerbInfo(R),
    b"get_bundle": VerbInfo(R),
    b"Transport.is_readonly": VerbInfo(R),
    b"put": VerbInfo(I, "writes the whole file; the same bytes twice give the same file"),
    b"put_non_atomic": VerbInfo(I, "writes the whole file; the same bytes twice give the same file"),
    b"append": VerbInfo(M, "adds bytes at the end: twice means the bytes appear twice"),
    b"delete": VerbInfo(V, "a repeat may delete a file created since the first"),
    b"mkdir": VerbInfo(V, "a repeat fails with FileExists"),
    b"rmdir": VerbInfo(V, "a repeat may remove a directory created since the first"),
    b"rename": VerbInfo(V, "a repeat may move a file that took the old name"),
    b"move": VerbInfo(V, "a repeat may move a file that took the old name"),
    # BzrDir.
    b"BzrDir.open": VerbInfo(R),
    b"BzrDir.open_2.1": VerbInfo(R),
    b"BzrDir.open_branch": VerbInfo(R),
    b"BzrDir.open_branchV2": VerbInfo(R),
    b"BzrDir.open_branchV3": VerbInfo(R),
    b"BzrDir.find_repository": VerbInfo(R),
    b"BzrDir.find_repositoryV2": VerbInfo(R),
    b"BzrDir.find_repositoryV3": VerbInfo(R),
    b"BzrDir.get_branches": VerbInfo(R),
    b"BzrDir.get_config_file": VerbInfo(R),
    b"BzrDir.has_workingtree": VerbInfo(R),
    b"BzrDir.checkout_metadir": VerbInfo(R),
    b"BzrDir.cloning_metadir": VerbInfo(R),
    b"BzrDir.create_branch": VerbInfo(S, _CREATE),
    b"BzrDir.create_repository": VerbInfo(S, _CREATE),
    b"BzrDir.destroy_branch": VerbInfo(S, _DESTROY),
    b"BzrDir.destroy_repository": VerbInfo(S, _DESTROY),
    b"BzrDirFormat.initialize": VerbInfo(S, _CREATE),
    b"BzrDirFormat.initialize_ex_1.16": VerbInfo(S, _CREATE),
    # Branch.
    b"Branch.get_all_reference_info": VerbInfo(R),
    b"Branch.get_config_file": VerbInfo(R),
    b"Branch.get_parent": VerbInfo(R),
    b"Branch.get_physical_lock_status": VerbInfo(R),
    b"Branch.get_stacked_on_url": VerbInfo(R),
    b"Branch.get_tags_bytes": VerbInfo(R),
    b"Branch.heads_to_fetch": VerbInfo(R),
    b"Branch.last_revision_info": VerbInfo(R),
    b"Branch.revision_history": VerbInfo(R),
    b"Branch.revision_id_to_revno": VerbInfo(R),
    b"Branch.break_lock": VerbInfo(I, "breaking a lock that is already broken changes nothing"),
    b"Branch.put_config_file": VerbInfo(I, "replaces the whole file"),
    b"Branch.set_config_option": VerbInfo(I, _SETS),
    b"Branch.set_config_option_dict": VerbInfo(I, _SETS),
    b"Branch.set_last_revision": VerbInfo(I, _SETS),
    b"Branch.set_last_revision_ex": VerbInfo(I, _SETS),
    b"Branch.set_last_revision_info": VerbInfo(I, _SETS),
    b"Branch.set_parent_location": VerbInfo(I, _SETS),
    b"Branch.set_tags_bytes": VerbInfo(I, "replaces the whole tag dictionary"),
    b"Branch.lock_write": VerbInfo(S, _LOCK),
    b"Branch.unlock": VerbInfo(S, _UNLOCK),
    # Repository.
    b"Repository.all_revision_ids": VerbInfo(R),
    b"Repository.annotate_file_revision": VerbInfo(R),
    b"Repository.check_write_group": VerbInfo(R, "only checks that the write group is still valid"),
    b"Repository.gather_stats": VerbInfo(R),
    b"Repository.get_parent_map": VerbInfo(R),
    b"Repository.get_physical_lock_status": VerbInfo(R),
    b"Repository.get_rev_id_for_revno": VerbInfo(R),
    b"Repository.get_revision_graph": VerbInfo(R),
    b"Repository.get_revision_signature_text": VerbInfo(R),
    b"Repository.get_stream": VerbInfo(R, "a response stream; the request has no body"),
    b"Repository.get_stream_1.19": VerbInfo(R, "a response stream; the request has no body"),
    b"Repository.get_stream_for_missing_keys": VerbInfo(R, "a response stream; the request has no body"),
    b"Repository.has_revision": VerbInfo(R),
    b"Repository.has_signature_for_revision_id": VerbInfo(R),
    b"Repository.is_shared": VerbInfo(R),
    b"Repository.iter_files_bytes": VerbInfo(R),
    b"Repository.iter_revisions": VerbInfo(R),
    b"Repository.make_working_trees": VerbInfo(R, "despite its name, only asks the setting"),
    b"Repository.revision_archive": VerbInfo(R),
    b"Repository.tarball": VerbInfo(R),
    b"VersionedFileRepository.get_inventories": VerbInfo(R),
    b"VersionedFileRepository.get_serializer_format": VerbInfo(R),
    b"PackRepository.autopack": VerbInfo(I, "packing packed data again changes nothing"),
    b"Repository.pack": VerbInfo(I, "packing packed data again changes nothing"),
    b"Repository.reconcile": VerbInfo(I, "a reconciled repository reconciles to itself"),
    b"Repository.break_lock": VerbInfo(I, "breaking a lock that is already broken changes nothing"),
    b"Repository.add_signature_text": VerbInfo(I, "stores the same signature under the same revision"),
    b"Repository.set_make_working_trees": VerbInfo(I, _SETS),
    b"Repository.lock_write": VerbInfo(S, _LOCK),
    b"Repository.unlock": VerbInfo(S, _UNLOCK),
    b"Repository.start_write_group": VerbInfo(S, "a second start fails or opens a group the first leaves unused"),
    b"Repository.commit_write_group": VerbInfo(S, "a second commit fails: the group is gone"),
    b"Repository.abort_write_group": VerbInfo(S, "a second abort fails: the group is gone"),
    b"Repository.insert_stream": VerbInfo(T),
    b"Repository.insert_stream_1.19": VerbInfo(T),
    b"Repository.insert_stream_locked": VerbInfo(T),
}

del R, I, S, V, M, T

_UNKNOWN = VerbInfo(VerbClass.MUTATE, "not in the table: never resent")


def describe(verb: bytes) -> VerbInfo:
    """The table entry for ``verb``; an unknown verb is ``mutate``."""
    return TABLE.get(verb, _UNKNOWN)


def classify(verb: bytes) -> VerbClass:
    """The class of ``verb``; an unknown verb is ``VerbClass.MUTATE``."""
    return TABLE.get(verb, _UNKNOWN).verb_class


class FailurePoint(enum.Enum):
    """How far a request got before its connection was lost."""

    BEFORE_WRITE = "before write"  # EOF seen before the first byte was written
    DURING_WRITE = "during write"  # lost while the request was being written
    AFTER_WRITE = "after write"  # whole request written, no response byte yet
    DURING_RESPONSE = "during response"  # part of the response was received


_RESEND_AFTER_WRITE = frozenset({VerbClass.READ, VerbClass.IDEM, VerbClass.SEMI})
_RESEND_DURING_RESPONSE = frozenset({VerbClass.READ, VerbClass.IDEM})


def may_resend(
    verb_class: VerbClass,
    point: FailurePoint,
    *,
    not_run: bool = False,
    body_replayable: bool = True,
) -> bool:
    """Whether a request that failed at ``point`` may be sent again.

    ``not_run`` is True when the server said it did not run the request:
    it was draining (SSH exit-status 75 before any response byte; a
    draining server never starts a request it has not begun), or it turned
    the connection away unread (``TooManyConnections``). ``body_replayable``
    is False when the request's body was a one-shot stream that has been
    read from.
    """
    if point is FailurePoint.BEFORE_WRITE:
        return True
    if not body_replayable:
        return False
    if point is FailurePoint.DURING_WRITE:
        # The server discards a v3 message that never reached its end.
        return True
    if point is FailurePoint.AFTER_WRITE:
        return not_run or verb_class in _RESEND_AFTER_WRITE
    return verb_class in _RESEND_DURING_RESPONSE
