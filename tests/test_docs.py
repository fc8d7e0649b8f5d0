"""Checks that the documentation says what the code does."""

from pathlib import Path

from smartserve.verbs import TABLE

PROTOCOL_DOC = Path(__file__).resolve().parent.parent / "doc" / "protocol.md"
VERB_TABLE_HEADING = "## Verb table"


def verb_table_rows() -> list[tuple[str, str, str]]:
    """The rows doc/protocol.md's verb table must have, in the table's order."""
    return [(verb.decode("ascii"), info.verb_class.value, info.why) for verb, info in TABLE.items()]


def render_verb_table() -> str:
    """The verb table as Markdown, as doc/protocol.md holds it."""
    lines = ["| verb | class | why |", "|---|---|---|"]
    lines += [f"| `{verb}` | {verb_class} | {why} |" for verb, verb_class, why in verb_table_rows()]
    return "\n".join(lines)


def documented_verb_rows(text: str) -> list[tuple[str, str, str]]:
    """The rows of the verb table in ``text``, the Markdown of doc/protocol.md."""
    section = text.split(VERB_TABLE_HEADING, 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("| `"):
            verb, verb_class, why = (cell.strip() for cell in line.strip().strip("|").split("|"))
            rows.append((verb.strip("`"), verb_class, why))
    return rows


def test_protocol_doc_verb_table_matches_verbs_table():
    """doc/protocol.md lists every verb of smartserve.verbs.TABLE with its class and reason."""
    text = PROTOCOL_DOC.read_text(encoding="utf-8")
    assert VERB_TABLE_HEADING in text
    assert documented_verb_rows(text) == verb_table_rows(), (
        "doc/protocol.md's verb table differs from smartserve.verbs.TABLE; it should read:\n\n"
        + render_verb_table()
    )


def test_documented_verb_rows_reads_rendered_table():
    """The doc parser reads back exactly what the renderer writes."""
    text = f"intro\n\n{VERB_TABLE_HEADING}\n\n{render_verb_table()}\n\n## Next\n\n| `x` | read |  |\n"
    assert documented_verb_rows(text) == verb_table_rows()
