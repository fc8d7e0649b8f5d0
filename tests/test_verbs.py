"""Tests for smartserve.verbs, the shared idempotency table."""

import pytest
from breezy.bzr.smart.request import request_handlers

from smartserve.verbs import TABLE, FailurePoint, VerbClass, classify, describe, may_resend


def test_classify_matches_breezy_registry():
    """Every verb Breezy's server knows has the class Breezy gives it."""
    verbs = list(request_handlers.keys())
    assert verbs, "Breezy's registry is empty"
    mismatches = {
        verb: (classify(verb).value, request_handlers.get_info(verb))
        for verb in verbs
        if classify(verb).value != request_handlers.get_info(verb)
    }
    assert mismatches == {}


def test_table_has_no_verb_breezy_lacks():
    """The table names no verb that Breezy's server does not know."""
    assert set(TABLE) - set(request_handlers.keys()) == set()


def test_classify_unknown_verb_is_mutate():
    """A verb missing from the table is never considered safe to repeat."""
    assert classify(b"Frobnicate.now") is VerbClass.MUTATE
    assert describe(b"Frobnicate.now").why


def test_verb_class_values_are_breezy_words():
    """Each enum member's value is the word Breezy uses for it."""
    assert {c.value for c in VerbClass} == {"read", "idem", "semi", "semivfs", "mutate", "stream"}


def test_non_read_entries_say_why():
    """Every entry whose class is not obvious from its name explains itself."""
    for verb, info in TABLE.items():
        if info.verb_class in (VerbClass.SEMI, VerbClass.SEMIVFS, VerbClass.MUTATE, VerbClass.IDEM):
            assert info.why, verb


@pytest.mark.parametrize("verb_class", list(VerbClass))
def test_may_resend_before_write_always(verb_class):
    """EOF seen before writing is not a failure: any verb is sent once."""
    assert may_resend(verb_class, FailurePoint.BEFORE_WRITE, body_replayable=False)


@pytest.mark.parametrize("verb_class", list(VerbClass))
def test_may_resend_during_write_unless_body_consumed(verb_class):
    """An unfinished request was discarded by the server, unless the body cannot be replayed."""
    assert may_resend(verb_class, FailurePoint.DURING_WRITE)
    assert not may_resend(verb_class, FailurePoint.DURING_WRITE, body_replayable=False)


@pytest.mark.parametrize(
    "verb_class, expected",
    [
        (VerbClass.READ, True),
        (VerbClass.IDEM, True),
        (VerbClass.SEMI, True),
        (VerbClass.SEMIVFS, False),
        (VerbClass.MUTATE, False),
        (VerbClass.STREAM, False),
    ],
)
def test_may_resend_after_write(verb_class, expected):
    """Once fully sent with no drain signal, only read, idem and semi are resent."""
    assert may_resend(verb_class, FailurePoint.AFTER_WRITE) is expected


@pytest.mark.parametrize("verb_class", list(VerbClass))
def test_may_resend_after_write_when_the_server_said_it_did_not_run_it(verb_class):
    """A draining server never began the request, so any verb is resent."""
    assert may_resend(verb_class, FailurePoint.AFTER_WRITE, not_run=True)
    assert not may_resend(
        verb_class, FailurePoint.AFTER_WRITE, not_run=True, body_replayable=False
    )


@pytest.mark.parametrize(
    "verb_class, expected",
    [
        (VerbClass.READ, True),
        (VerbClass.IDEM, True),
        (VerbClass.SEMI, False),
        (VerbClass.SEMIVFS, False),
        (VerbClass.MUTATE, False),
        (VerbClass.STREAM, False),
    ],
)
def test_may_resend_during_response(verb_class, expected):
    """A response cut in its body is resent whole only for read and idem verbs."""
    assert may_resend(verb_class, FailurePoint.DURING_RESPONSE) is expected


def test_append_is_never_resent_once_written():
    """append, the verb that corrupts on repeat, is never resent after it was written."""
    cls = classify(b"append")
    assert not may_resend(cls, FailurePoint.AFTER_WRITE)
    assert not may_resend(cls, FailurePoint.DURING_RESPONSE)
