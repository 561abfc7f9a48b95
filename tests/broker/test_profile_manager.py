"""The manager's side of profiles and ^C, without SLURM: which profile a login gets, the
one-line refusals, a forged profile tag, and who may cancel a waiting session."""

from __future__ import annotations

import os
import pwd

import pytest

from broker.audit import Audit
from broker.config import parse
from broker.identity import User
from broker.manager import Manager, SessionError
from broker.session import Session, State
from broker.slurm.runner import Runner
from broker.store import Store

ME = pwd.getpwuid(os.getuid())
USER = User(ME.pw_name, ME.pw_uid, ME.pw_gid, (ME.pw_gid,), ME.pw_dir, "/bin/sh")
CONFIG = {"container": {"image": "/i.sif"}, "profiles": {
    "cpu": {"default": True}, "gpu": {"gres": "gpu:1"}, "staff": {"groups": ["no-such-group-16"]}}}


@pytest.fixture
def manager(tmp_path):
    return Manager(parse(CONFIG), Runner(path="/usr/bin:/bin"), Store(tmp_path / "s.db"),
                   Audit(tmp_path / "a.jsonl"))


def live(manager: Manager, profile: str, state: State = State.READY, project: str = "p") -> Session:
    s = Session(user=USER.name, uid=USER.uid, project=project, profile=profile, job_id="7")
    s.move(State.SUBMITTED)
    if state != State.SUBMITTED:
        s.move(State.PENDING if state == State.PENDING else State.STARTING)
    if state == State.READY:
        s.move(State.READY)
    manager._track(s)
    return s


async def test_a_live_session_of_another_profile_is_refused_in_one_line_naming_it(manager):
    live(manager, "cpu")
    with pytest.raises(SessionError) as err:
        await manager.ensure(USER, "p", profile="gpu")
    assert (err.value.code, err.value.message) == ("profile_mismatch", (
        "session: project p runs profile cpu, not gpu; to use gpu, end it first with `sbroker kill p`"
        " (or connect without a profile to use it)"))


async def test_no_profile_or_keep_joins_whatever_runs(manager):
    s = live(manager, "cpu")
    assert await manager.ensure(USER, "p") is s
    assert await manager.ensure(USER, "p", profile="gpu", mismatch="keep") is s
    assert await manager.ensure(USER, "p", profile="cpu") is s


@pytest.mark.parametrize("requested", ["staff", "nope", "../../etc", "gpu\n"])
async def test_unknown_and_forbidden_profiles_are_refused_before_anything_is_made(manager, requested):
    with pytest.raises(SessionError) as err:
        await manager.ensure(USER, "newproj", profile=requested)
    assert err.value.code == "profile"
    assert err.value.message.endswith("for you; choose one of: cpu, gpu")
    assert not manager.sessions


async def test_a_bad_mismatch_answer_is_one_line(manager):
    with pytest.raises(SessionError, match="mismatch: must be refuse, keep or replace"):
        await manager.ensure(USER, "p", profile="gpu", mismatch="whatever")


def test_a_forged_profile_tag_selects_nothing_the_config_lacks(manager):
    assert manager.tag_profile({"profile": "gpu"}) == "gpu"
    assert manager.tag_profile({"profile": "root-only"}) == ""
    assert manager.tag_profile({"profile": ""}) == ""
    assert manager.tag_profile({}) == "cpu"  # a job of a broker from before profiles: the default ran


async def test_cancel_pending_only_for_the_login_that_made_it_and_only_alone(manager):
    maker, other = object(), object()
    s = live(manager, "cpu", State.PENDING)
    manager._made_by[s.id] = maker
    assert await manager.cancel_pending(USER, "p", other) == (
        "cancelled; the session of p was started by another login and stays")
    manager._waiting[s.id] = 1
    assert await manager.cancel_pending(USER, "p", maker) == (
        "cancelled; another login waits for the session of p, so it stays")
    assert s.state == State.PENDING
    ready = live(manager, "cpu", State.READY, project="q")
    manager._made_by[ready.id] = maker
    assert await manager.cancel_pending(USER, "q", maker) == "cancelled; the session of q is ready and stays"


def test_metrics_count_live_sessions_by_profile(manager):
    from broker.metrics import LiveCollector

    live(manager, "gpu", project="a")
    live(manager, "gpu", State.PENDING, project="b")
    live(manager, "", project="c")  # adopted, its tag named no profile of this config
    family = next(f for f in LiveCollector(manager).collect() if f.name == "sbroker_live_sessions_by_profile")
    assert {s.labels["profile"]: s.value for s in family.samples} == {
        "cpu": 0, "gpu": 2, "staff": 0, "unknown": 1}


def test_a_session_stored_before_profiles_gets_its_jobs_profile_at_start(manager):
    from broker.slurm.parse import JobInfo

    s = Session(user=USER.name, uid=USER.uid, project="p", instance="sb-x-p-abc123", job_id="7")
    s.move(State.SUBMITTED)
    s.move(State.STARTING)
    s.move(State.READY)
    manager._track(s)
    manager.owner_of = lambda info: USER  # this test may run as root, who owns no sessions
    comment = f"sbroker/v1 user={USER.name} project=p instance=sb-x-p-abc123 digest=00"  # no profile= tag
    manager._reconcile({"7": JobInfo("7", "RUNNING", "None", "n1", "", "1:00:00", USER.name, "", comment,
                                     USER.uid)})
    assert s.profile == "cpu"


def test_the_profile_is_persisted_with_the_session(tmp_path):
    store = Store(tmp_path / "p.db")
    s = Session(user="alice", uid=1001, project="p", profile="gpu")
    store.save(s)
    assert store.get(s.id).profile == "gpu"
    assert [x.profile for x in store.live()] == ["gpu"]
