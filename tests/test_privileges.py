"""The privilege model (vmci-sdk.md section 4.4) and the policy file, without any transport."""
import pytest

from vsockcompat import errors
from vsockcompat.constants import (
    VMCI_ERROR_INVALID_PRIV,
    VMCI_ERROR_NO_ACCESS,
    VMCI_PRIV_ASSIGN_CLIENT,
    VMCI_PRIV_CH_PRIV,
    VMCI_PRIV_DESTROY_RESOURCE,
    VMCI_PRIV_DG_SEND,
    VMCI_PRIV_SM_ATTACH,
    VMCI_PRIVILEGE_FLAG_RESTRICTED,
    VMCI_PRIVILEGE_FLAG_TRUSTED,
    VMCI_SUCCESS_ACCESS_GRANTED,
)
from vsockcompat.handles import VMCIHandle
from vsockcompat.policy import Policy, PolicyError, deny_interaction, load_policy, policy_path
from vsockcompat.privileges import ClientPrivileges

R, T, N = VMCI_PRIVILEGE_FLAG_RESTRICTED, VMCI_PRIVILEGE_FLAG_TRUSTED, 0
ENDPOINT = VMCIHandle(2, 1024)
CLIENT = VMCIHandle(3, 1030)
CLIENT_CONTEXT = VMCIHandle(3, 0)
GROUP = VMCIHandle(2, 1100)
PUBLIC = VMCIHandle(2, 1023)


def groups_of(handle):
    return [GROUP, PUBLIC] if handle.context == CLIENT_CONTEXT.context else [PUBLIC]


@pytest.mark.parametrize("a,b,denied", [
    (N, N, False), (T, T, False), (R, T, False), (T, R, False), (R | T, T, False),
    (R, N, True), (N, R, True), (R, R, True), (R | T, R, True),
])
def test_the_interaction_rule_is_checked_both_ways(a, b, denied):
    assert deny_interaction(a, b) is denied
    assert deny_interaction(b, a) is denied


def test_deny_wins_and_answers_follow_check_client_privilege():
    acl = ClientPrivileges(ENDPOINT, "datagram")
    assert acl.check(CLIENT, VMCI_PRIV_DG_SEND) == VMCI_ERROR_INVALID_PRIV  # not set
    assert acl.permits(CLIENT, VMCI_PRIV_DG_SEND), "nothing set stays open"
    acl.add(CLIENT, [VMCI_PRIV_DG_SEND], [VMCI_PRIV_DG_SEND])
    assert acl.check(CLIENT, VMCI_PRIV_DG_SEND) == VMCI_ERROR_NO_ACCESS
    acl.add(CLIENT, [VMCI_PRIV_DG_SEND], [])
    assert acl.check(CLIENT, VMCI_PRIV_DG_SEND) == VMCI_SUCCESS_ACCESS_GRANTED


def test_the_owner_context_holds_ch_priv_and_destroy():
    acl = ClientPrivileges(ENDPOINT, "datagram")
    for priv in (VMCI_PRIV_CH_PRIV, VMCI_PRIV_DESTROY_RESOURCE):
        assert acl.check(VMCIHandle(2, 0), priv) == VMCI_SUCCESS_ACCESS_GRANTED
        assert acl.check(CLIENT_CONTEXT, priv) == VMCI_ERROR_INVALID_PRIV


def test_own_setting_then_context_then_groups_in_order():
    acl = ClientPrivileges(ENDPOINT, "datagram")
    acl.add(PUBLIC, [], [VMCI_PRIV_DG_SEND])
    assert acl.check(CLIENT, VMCI_PRIV_DG_SEND, groups_of) == VMCI_ERROR_NO_ACCESS
    acl.add(GROUP, [VMCI_PRIV_DG_SEND], [])
    assert acl.check(CLIENT, VMCI_PRIV_DG_SEND, groups_of) == VMCI_SUCCESS_ACCESS_GRANTED, \
        "the context's own group comes before the public group"
    acl.add(CLIENT_CONTEXT, [], [VMCI_PRIV_DG_SEND])
    assert acl.check(CLIENT, VMCI_PRIV_DG_SEND, groups_of) == VMCI_ERROR_NO_ACCESS
    acl.add(CLIENT, [VMCI_PRIV_DG_SEND], [])
    assert acl.check(CLIENT, VMCI_PRIV_DG_SEND, groups_of) == VMCI_SUCCESS_ACCESS_GRANTED
    assert acl.check(VMCIHandle(3, 1031), VMCI_PRIV_DG_SEND, groups_of) == VMCI_ERROR_NO_ACCESS


@pytest.mark.parametrize("kind,valid,invalid", [
    ("datagram", VMCI_PRIV_DG_SEND, VMCI_PRIV_SM_ATTACH),
    ("sharedmem", VMCI_PRIV_SM_ATTACH, VMCI_PRIV_DG_SEND),
    ("group", VMCI_PRIV_ASSIGN_CLIENT, VMCI_PRIV_DG_SEND),
    ("queuepair", VMCI_PRIV_CH_PRIV, VMCI_PRIV_SM_ATTACH),
])
def test_privileges_valid_per_kind_and_nothing_changes_on_error(kind, valid, invalid):
    acl = ClientPrivileges(ENDPOINT, kind)
    acl.add(CLIENT, [valid], [])
    with pytest.raises(errors.InvalidPriv):
        acl.add(CLIENT, [valid], [invalid])
    assert acl.entries == {CLIENT: {valid: 0x1000}}


@pytest.mark.parametrize("allow,deny,error", [
    ([], [], errors.InvalidArgs),
    ([7], [], errors.InvalidPriv),
    ([-1], [], errors.InvalidPriv),
    (["4"], [], errors.InvalidArgs),
    ([4.0], [], errors.InvalidArgs),
    ([True], [], errors.InvalidArgs),
    (4, [], errors.InvalidArgs),
    ([4], None, errors.InvalidArgs),
])
def test_bad_privilege_lists(allow, deny, error):
    with pytest.raises(error):
        ClientPrivileges(ENDPOINT, "datagram").add(CLIENT, allow, deny)


def test_remove_and_remove_all():
    acl = ClientPrivileges(ENDPOINT, "datagram")
    with pytest.raises(errors.InvalidArgs):
        acl.remove(CLIENT, [VMCI_PRIV_DG_SEND])
    with pytest.raises(errors.InvalidArgs):
        acl.remove_all(CLIENT)
    acl.add(CLIENT, [VMCI_PRIV_DG_SEND, VMCI_PRIV_CH_PRIV], [])
    acl.remove(CLIENT, [VMCI_PRIV_DG_SEND])
    assert acl.own_state(CLIENT, VMCI_PRIV_DG_SEND) is None
    assert acl.own_state(CLIENT, VMCI_PRIV_CH_PRIV) == 0x1000
    acl.remove(CLIENT, [VMCI_PRIV_CH_PRIV])
    assert CLIENT not in acl.entries, "a client left with no privileges is removed"
    acl.add(CLIENT, [VMCI_PRIV_DG_SEND], [])
    acl.remove_all(CLIENT)
    assert acl.entries == {}
    with pytest.raises(errors.InvalidArgs):
        acl.remove(CLIENT, [])


def test_storage_form_round_trips():
    acl = ClientPrivileges(ENDPOINT, "datagram")
    acl.add(CLIENT, [VMCI_PRIV_DG_SEND], [VMCI_PRIV_CH_PRIV])
    acl.add(PUBLIC, [], [VMCI_PRIV_DG_SEND])
    again = ClientPrivileges.from_text(ENDPOINT, acl.to_text())
    assert (again.resource, again.kind, again.entries) == (acl.resource, acl.kind, acl.entries)
    assert acl.to_text().splitlines() == ["vsockcompat-acl 1 datagram", "2 1023 4 deny",
                                          "3 1030 0 deny", "3 1030 4 allow"]
    again = ClientPrivileges.from_json(acl.to_json())
    assert (again.resource, again.kind, again.entries) == (acl.resource, acl.kind, acl.entries)


@pytest.mark.parametrize("text", ["", "vsockcompat-acl 2 datagram\n", "vsockcompat-acl 1 file\n",
                                  "vsockcompat-acl 1 datagram\n3 0 99 allow\n",
                                  "vsockcompat-acl 1 datagram\n3 0 4 maybe\n",
                                  "vsockcompat-acl 1 datagram\n3 0\n",
                                  "vsockcompat-acl 1 datagram\n+3 0 4 allow\n",
                                  "vsockcompat-acl 1 datagram\n1_0 0 4 allow\n",
                                  "vsockcompat-acl 1 datagram\n4294967296 0 4 allow\n",
                                  "vsockcompat-acl 1 datagram\n3  0 4 allow\n",
                                  "vsockcompat-acl 1 datagram\x0b3 0 4 allow\n",
                                  "vsockcompat-acl 1 datagram\n03 0 4 allow\n"])
def test_a_damaged_privileges_file_is_an_error(text):
    with pytest.raises((ValueError, KeyError)):
        ClientPrivileges.from_text(ENDPOINT, text)


# The policy file

def write(tmp_path, text):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return str(path)


def test_a_policy_file_sets_flags_owners_and_the_register_rule(tmp_path):
    policy = load_policy(write(tmp_path, """
        [discovery]
        register = "trusted"

        [contexts.3]
        flags = ["restricted"]
        uid = 1000

        [contexts.4]
        flags = ["trusted"]
    """))
    assert policy.flags(3) == R and policy.uid(3) == 1000
    assert policy.flags(4) == T and policy.uid(4) is None
    assert policy.flags(5) == 0 and policy.flags(0) == T and policy.flags(1) == T
    assert policy.denies(3, 5) and policy.denies(3, 2) and not policy.denies(3, 4) and not policy.denies(3, 1)
    assert not policy.may_register(2) and policy.may_register(4)
    assert policy.with_register_rule("permissive").may_register(2)
    assert policy.as_dict()["contexts"]["3"] == {"flags": ["restricted"], "uid": 1000}


def test_without_a_file_everything_is_permissive(tmp_path):
    policy = load_policy(policy_path(str(tmp_path), None))
    assert policy.path is None and policy.ds_register == "permissive"
    assert not policy.denies(2, 3) and policy.may_register(3)
    assert policy_path(str(tmp_path), "/elsewhere.toml") == "/elsewhere.toml"
    write(tmp_path, "")
    assert policy_path(str(tmp_path), None) == str(tmp_path / "policy.toml")


@pytest.mark.parametrize("text,line,words", [
    ('[contexts.3]\nflags = ["restricted" "trusted"]\n', 2, "line 2"),
    ('[contexts.3]\nflags = ["restricted", "root"]\n', 2, "unknown flag 'root'"),
    ('\n[contexts.3]\nflags = "trusted"\n', 3, "must be a list"),
    ('[contexts.x3]\nflags = []\n', 1, "is not a number"),
    ('[contexts.3]\nflagz = []\n', 2, "unknown key 'flagz'"),
    ('[contexts.3]\nuid = -1\n', 2, "uid must be"),
    ('[discovery]\n\nregister = "open"\n', 3, "register must be one of"),
    ('[discovery]\nowner = 1\n', 2, "unknown key 'owner'"),
    ('contexts = 3\n', 1, "must hold tables"),
    ('[context.3]\nflags = []\n', 1, "unknown section 'context'"),
])
def test_a_malformed_policy_names_the_line(tmp_path, text, line, words):
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    message = str(info.value)
    assert message.startswith(path), message
    assert words in message, message
    if "line" not in words:
        assert message.startswith("%s:%d:" % (path, line)), message


def test_an_unreadable_policy_is_an_error(tmp_path):
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(str(tmp_path / "missing.toml"))
    (tmp_path / "bad.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(PolicyError, match="not UTF-8"):
        load_policy(str(tmp_path / "bad.toml"))


def test_policy_rejects_an_unknown_register_rule():
    with pytest.raises(PolicyError):
        Policy(ds_register="open")
