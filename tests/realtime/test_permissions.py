"""The policy as a table: every role against every action."""

from types import SimpleNamespace

import pytest

from realtime.domain.policy import Action, can

ALICE = SimpleNamespace(pk=1, is_authenticated=True, is_active=True, is_staff=False)
STAFF = SimpleNamespace(pk=9, is_authenticated=True, is_active=True, is_staff=True)
INACTIVE = SimpleNamespace(pk=2, is_authenticated=True, is_active=False, is_staff=False)
ANON = SimpleNamespace(pk=None, is_authenticated=False, is_active=False, is_staff=False)

OWN, OTHER = 1, 5


@pytest.mark.parametrize(
    "user, public, role, action, author, allowed",
    [
        # public room: no membership acts as member
        (ALICE, True, None, Action.VIEW, None, True),
        (ALICE, True, None, Action.POST, None, True),
        (ALICE, True, "reader", Action.VIEW, None, True),
        (ALICE, True, "reader", Action.POST, None, False),
        (ALICE, True, "reader", Action.EDIT, OWN, False),
        (ALICE, True, "reader", Action.DELETE, OWN, False),
        (ALICE, True, "member", Action.EDIT, OWN, True),
        (ALICE, True, "member", Action.EDIT, OTHER, False),
        (ALICE, True, "member", Action.DELETE, OWN, True),
        (ALICE, True, "member", Action.DELETE, OTHER, False),
        (ALICE, True, "moderator", Action.DELETE, OTHER, True),
        (ALICE, True, "moderator", Action.EDIT, OTHER, False),
        (ALICE, True, "owner", Action.DELETE, OTHER, True),
        # private room: members only
        (ALICE, False, None, Action.VIEW, None, False),
        (ALICE, False, None, Action.POST, None, False),
        (ALICE, False, "member", Action.POST, None, True),
        (ALICE, False, "reader", Action.VIEW, None, True),
        # staff read and moderate everywhere, post by role only
        (STAFF, False, None, Action.VIEW, None, True),
        (STAFF, False, None, Action.DELETE, OTHER, True),
        (STAFF, False, None, Action.POST, None, False),
        # reacting is posting's right
        (ALICE, True, None, Action.REACT, None, True),
        (ALICE, True, "reader", Action.REACT, None, False),
        (ALICE, False, None, Action.REACT, None, False),
        (ALICE, False, "member", Action.REACT, None, True),
        (STAFF, True, None, Action.REACT, None, True),
        (STAFF, False, None, Action.REACT, None, False),
        # nobody who is not signed in, or deactivated
        (ANON, True, None, Action.VIEW, None, False),
        (INACTIVE, True, "owner", Action.VIEW, None, False),
    ],
)
def test_policy(user, public, role, action, author, allowed):
    decision = can(user, action, is_public=public, role=role, author_id=author)
    assert bool(decision) is allowed
    assert (decision.reason == "") is allowed
