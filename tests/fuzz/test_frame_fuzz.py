"""The frame fuzzer: mutated guest frames through the compiled NAT engine, in-process.

Real EventLoop (debug=True: a callback's exception propagates), real Engine, real host
sockets, all on loopback: the Policy lets the NAT reach only the test's own endpoints and
the egress guard (tests/fuzz/guard.py) refuses anything else before the system call.
Every corpus file (tests/fuzz/corpus) is replayed first; then cases drawn from the corpus
are fitted to the run (ports, ACK numbers), mutated and sent until the budget is spent.

VOIDBOX_FUZZ_SECONDS sets the budget (default DEFAULT_SECONDS), VOIDBOX_FUZZ_SEED the
random seed (default: a fresh one, printed). A failing case is written under the test's
tmp dir in corpus format, and printed as hex. See tests/fuzz/README.md.
"""

from __future__ import annotations

import collections
import gc
import os
import random
import signal
import sys
import threading
import time

import pytest

from tests.fuzz import frames as F
from tests.fuzz.guard import EgressBlocked, Guard, open_fd_count, unguarded_sockets
from tests.fuzz.mutate import mutate, refragment
from tests.fuzz.rig import FD_SLACK, FLOW_BOUND, MAX_FLOWS, Endpoints, Rig, fuzz_policy
from tests.unit.netframes import DNS, GATEWAY
from voidbox.net import fastpath
from voidbox.net.engine import Engine
from voidbox.net.packets import ETH_P_IP, IPPROTO_ICMP, IPPROTO_TCP, parse_ethernet, parse_ipv4
from voidbox.net.policy import Policy
from voidbox.net.tcp import ACK, RST, SYN

DEFAULT_SECONDS = 20.0
GENERATION_SECONDS = 5.0  # then the engine is closed (and checked) and a new one made
CASE_TIMEOUT = 10.0  # one case (a few frames and loop turns) taking longer is a hang
RSS_GROWTH_MB = 64  # bound on RSS growth from the end of the first generation
CHECK_EVERY = 16  # cases between fd and RSS checks
STRAY_CHECK_EVERY = 256  # cases between looks for sockets made around the guard (costly)
# Corpus files that still crash or hang the engine, with the reason (xfail strict).
KNOWN_FAILURES: dict[str, str] = {}


class Hang(BaseException):
    """A case ran longer than CASE_TIMEOUT (BaseException: no `except Exception` eats it)."""


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture
def endpoints():
    e = Endpoints(random.Random(0))
    yield e
    e.close()


@pytest.fixture
def guard(monkeypatch, endpoints):
    g = Guard(endpoints.ports)
    g.install(monkeypatch)
    return g


class Recorder:
    """The frames of the current case, and of the cases before it, for the failure report."""

    def __init__(self):
        self.case: list[tuple[bool, bytes]] = []
        self.name = ""
        self.recent: collections.deque = collections.deque(maxlen=64)

    def start(self, name: str) -> None:
        if self.case:
            self.recent.append((self.name, self.case))
        self.name, self.case = name, []

    def report(self, tmp_path, seed: int, err: BaseException) -> str:
        path = tmp_path / "fuzz-failure.hex"
        path.write_text(F.dumps(self.case, f"VOIDBOX_FUZZ_SEED={seed} case from {self.name}: "
                                           f"{type(err).__name__}: {err}"))
        context = [fr for _, case in self.recent for fr in case] + self.case
        (tmp_path / "fuzz-failure-context.hex").write_text(
            F.dumps(context, f"the last {len(self.recent)} cases before the failing one, then it"))
        lines = [("verified " if v else "") + f.hex() for v, f in self.case]
        return f"failing case written to {path}:\n" + "\n".join(lines)


class Stats:
    def __init__(self):
        self.frames = self.cases = self.generations = self.frames_out = 0
        self.max_flows = self.max_fds_over = 0
        self.counters: collections.Counter = collections.Counter()


def run_case(rig: Rig, rng: random.Random, frames, stats: Stats, rec: Recorder,
             mutating: bool = True) -> None:
    sport = rng.randrange(1024, 65536) if mutating and rng.random() < 0.5 else None
    mutate_p = rng.choice((0.0, 0.2, 0.5, 1.0)) if mutating else 0.0
    for verified, frame in frames:
        f = rig.fit(frame, verified, sport)
        batch = [f]
        if mutating:
            if rng.random() < mutate_p:
                f = mutate(rng, f)
            batch = refragment(rng, f) if rng.random() < 0.05 else [f]
            if rng.random() < 0.05:
                verified = not verified
        for g in batch:
            rec.case.append((verified, g))
            rig.send(g, verified)
            stats.frames += 1
        if rng.random() < 0.25:
            rig.turn()
    rig.turn()
    if mutating and (rng.random() < 0.05 or len(rig.acks) >= MAX_FLOWS * 3 // 4):
        for rst in rig.resets(rng.randint(1, 16)):
            rec.case.append((False, rst))
            rig.send(rst)
            stats.frames += 1


def _alarm(_sig, _frame):
    raise Hang(f"a case took more than {CASE_TIMEOUT} s")


def test_fuzz_frames(endpoints, guard, tmp_path):
    assert fastpath.COMPILED or os.environ.get("VOIDBOX_PURE") == "1", \
        "the compiled voidbox._slirp is not in use"
    budget = float(os.environ.get("VOIDBOX_FUZZ_SECONDS", DEFAULT_SECONDS))
    seed = int(os.environ.get("VOIDBOX_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
    print(f"\nframe fuzzer: VOIDBOX_FUZZ_SEED={seed} VOIDBOX_FUZZ_SECONDS={budget:g}")
    fuzz(endpoints, guard, tmp_path, budget, seed)
    assert not guard.blocked


def fuzz(endpoints: Endpoints, guard: Guard, tmp_path, budget: float, seed: int) -> Stats:
    """Replay the corpus, then fuzz for `budget` seconds; raise on the first failure after
    writing the failing case to tmp_path/fuzz-failure.hex."""
    rng = random.Random(seed)
    endpoints.rng.seed(seed ^ 0x5EED)
    corpus = {os.path.basename(p): F.load(p) for p in F.corpus_files()}
    assert corpus, "the corpus is empty"
    names = sorted(corpus)
    policy = fuzz_policy(endpoints.ports)
    known_sockets = endpoints.fds() | set()
    stats, rec = Stats(), Recorder()
    use_alarm = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGALRM, _alarm) if use_alarm else None
    start = time.monotonic()
    deadline = start + budget
    rss_warm = rss_peak = None
    rig = None
    try:
        first = True
        while first or time.monotonic() < deadline:
            # Objects earlier tests left for the collector may close fds mid-run.
            gc.collect()
            fds_start = open_fd_count()
            rig = Rig(endpoints, policy, borrow=stats.generations % 2 == 1)
            gen_end = min(deadline, time.monotonic() + GENERATION_SECONDS)
            if first:  # every corpus file, as stored, before anything is mutated
                for name in names:
                    if name in KNOWN_FAILURES:
                        continue
                    rec.start(name)
                    if use_alarm:
                        signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT)
                    run_case(rig, rng, corpus[name], stats, rec, mutating=False)
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            first = False
            while time.monotonic() < gen_end:
                name = rng.choice(names)
                if name in KNOWN_FAILURES:
                    continue
                rec.start(name)
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT)
                run_case(rig, rng, corpus[name], stats, rec)
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                stats.cases += 1
                flows = rig.engine.flow_count()
                stats.max_flows = max(stats.max_flows, flows)
                assert flows <= FLOW_BOUND, f"{flows} flows, bound {FLOW_BOUND}"
                if stats.cases % CHECK_EVERY == 0:
                    fds = open_fd_count()
                    stats.max_fds_over = max(stats.max_fds_over, fds - fds_start)
                    assert fds <= fds_start + FLOW_BOUND + FD_SLACK, \
                        f"{fds} fds open, generation started with {fds_start}"
                    rss = rss_mb()
                    rss_peak = max(rss_peak or rss, rss)
                    if rss_warm is not None:
                        assert rss - rss_warm <= RSS_GROWTH_MB, \
                            f"RSS {rss:.0f} MB, {rss - rss_warm:.0f} MB above the first generation's"
                if stats.cases % STRAY_CHECK_EVERY == 0:
                    stray = unguarded_sockets(guard, known_sockets | endpoints.fds())
                    assert not stray, f"socket fds {stray} were not made through the guard"
            rec.start("engine.close()")
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT)
            stats.counters.update(rig.engine.counters)
            if rig.engine.tcp is not None:
                stats.counters.update(rig.engine.tcp.counters)
            stats.frames_out += rig.frames_out
            stats.generations += 1
            rig.close()
            rig = None
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
            endpoints.close_conns()
            fds = open_fd_count()
            assert fds == fds_start, f"{fds} fds open after engine.close(), {fds_start} before"
            if rss_warm is None:
                rss_warm = rss_mb()
    except BaseException as err:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
        print(rec.report(tmp_path, seed, err))
        print(f"reproduce: VOIDBOX_FUZZ_SEED={seed} VOIDBOX_FUZZ_SECONDS={budget:g}")
        raise
    finally:
        if use_alarm:
            signal.signal(signal.SIGALRM, old_handler)
        if rig is not None:
            rig.engine.close()
            rig.loop.close()
    elapsed = time.monotonic() - start
    top = ", ".join(f"{k}={v}" for k, v in stats.counters.most_common())
    print(f"frame fuzzer: {stats.frames} frames in {elapsed:.1f} s "
          f"({stats.frames / elapsed:.0f} frames/s), {stats.cases} cases, "
          f"{stats.generations} engines, {stats.frames_out} frames to the guest; "
          f"peak flows {stats.max_flows} (bound {FLOW_BOUND}), peak fds +{stats.max_fds_over} "
          f"(bound +{FLOW_BOUND + FD_SLACK}), RSS warm {rss_warm or 0:.0f} MB peak "
          f"{rss_peak or 0:.0f} MB (growth bound {RSS_GROWTH_MB} MB); guard refused "
          f"{len(guard.blocked)}\ncounters: {top}")
    return stats


def test_a_failure_is_written_and_printed_with_its_seed(endpoints, guard, tmp_path, monkeypatch,
                                                       capsys):
    real = Engine.guest_frame
    calls = []

    def faulty(self, frame, csum_verified=False):
        calls.append(frame)
        if len(calls) == 300:
            raise RuntimeError("planted")
        return real(self, frame, csum_verified)

    monkeypatch.setattr(Engine, "guest_frame", faulty)
    with pytest.raises(RuntimeError, match="planted"):
        fuzz(endpoints, guard, tmp_path, 5.0, seed=1234)
    saved = F.load(str(tmp_path / "fuzz-failure.hex"))
    assert saved and saved[-1][1] == bytes(calls[-1])
    printed = capsys.readouterr().out
    assert bytes(calls[-1]).hex() in printed and "VOIDBOX_FUZZ_SEED=1234" in printed
    assert "VOIDBOX_FUZZ_SEED=1234" in (tmp_path / "fuzz-failure.hex").read_text()


def test_a_hang_is_caught(endpoints, guard, tmp_path, monkeypatch):
    real = Engine.guest_frame
    calls = []

    def stuck(self, frame, csum_verified=False):
        calls.append(frame)
        if len(calls) == 300:
            while True:
                time.sleep(0.01)
        return real(self, frame, csum_verified)

    monkeypatch.setattr(Engine, "guest_frame", stuck)
    monkeypatch.setattr(sys.modules[__name__], "CASE_TIMEOUT", 0.5)
    with pytest.raises(Hang):
        fuzz(endpoints, guard, tmp_path, 5.0, seed=99)
    assert F.load(str(tmp_path / "fuzz-failure.hex"))[-1][1] == bytes(calls[-1])


# ---------------------------------------------------------------- the corpus, case by case

def replay(endpoints: Endpoints, policy: Policy, frames, turns: int = 20,
           counters: dict | None = None) -> list:
    """Send a stored case to a fresh engine; return every frame it sent the guest (and
    leave the engine's counters in `counters`)."""
    rig = Rig(endpoints, policy)
    out: list = []
    try:
        for verified, frame in frames:
            out += rig.send(rig.fit(frame, verified), verified)
        for _ in range(turns):
            rig.loop.run_once(0.005)
            endpoints.service()
            out += rig.drain()
    finally:
        rig.close()
        if counters is not None:
            counters.update(rig.engine.counters)
    return out


def _corpus_params():
    for path in F.corpus_files():
        name = os.path.basename(path)
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[name])] \
            if name in KNOWN_FAILURES else []
        yield pytest.param(path, id=name.removesuffix(".hex"), marks=marks)


@pytest.mark.parametrize("path", list(_corpus_params()))
def test_corpus_case_replays_cleanly(endpoints, guard, path):
    before = open_fd_count()
    replay(endpoints, fuzz_policy(endpoints.ports), F.load(path))
    endpoints.close_conns()
    assert open_fd_count() == before
    assert not guard.blocked


def test_seed_files_are_what_the_builders_make():
    """The checked-in seeds and regression cases are python -m tests.fuzz.frames's output."""
    built = {n: fr for n, fr in F.seeds().items()}
    built.update({n: fr for n, (_c, fr) in F.regression_cases().items()})
    for name, frames in built.items():
        assert F.load(os.path.join(F.CORPUS, name + ".hex")) == frames, name


def _tcp_replies(out):
    """(src ip, src port, flags) of each TCP segment sent to the guest."""
    got = []
    for frame in out:
        eth, payload = parse_ethernet(frame)
        if eth.ethertype != ETH_P_IP:
            continue
        ip, l4 = parse_ipv4(payload)
        if ip.proto == IPPROTO_TCP:
            got.append((bytes(ip.src), int.from_bytes(l4[0:2], "big"), l4[13]))
    return got


def _echo_replies(out):
    replies = []
    for frame in out:
        eth, payload = parse_ethernet(frame)
        if eth.ethertype == ETH_P_IP:
            ip, l4 = parse_ipv4(payload)
            if ip.proto == IPPROTO_ICMP and l4[0] == 0:
                replies.append(bytes(l4))
    return replies


def _case(name):
    return F.load(os.path.join(F.CORPUS, name + ".hex"))


def test_the_oracles_see_a_relay_and_a_reassembly(endpoints, guard):
    """What the regression tests look for is visible when it happens: a SYN to the test's
    listener is relayed (SYN-ACK) and a valid fragmented echo request is answered."""
    out = replay(endpoints, fuzz_policy(endpoints.ports), _case("seed-tcp-session-gateway")[:1])
    assert (GATEWAY, endpoints.service_port, SYN | ACK) in _tcp_replies(out)
    assert ("tcp", "127.0.0.1", endpoints.service_port) in guard.attempts
    out = replay(endpoints, fuzz_policy(endpoints.ports), _case("seed-fragments-icmp-echo-gateway"))
    assert len(_echo_replies(out)) == 1


def test_the_guard_refuses_before_the_syscall(guard):
    from voidbox.net import tcp_nat, udp

    for module, kind in ((tcp_nat, "SOCK_STREAM"), (udp, "SOCK_DGRAM")):
        s = module.socket.socket(module.socket.AF_INET, getattr(module.socket, kind))
        with s, pytest.raises(EgressBlocked):
            s.connect_ex(("10.0.2.77", 80))
        s2 = module.socket.socket(module.socket.AF_INET, getattr(module.socket, kind))
        with s2, pytest.raises(EgressBlocked):
            s2.connect(("127.0.0.1", 1))  # loopback, but not the test's
    assert len(guard.blocked) == 4
    guard.blocked.clear()


def test_defect3_syn_to_the_dns_address_port_80_is_reset_not_relayed(endpoints, guard):
    # The policy of issue 8's brief lets 127.0.0.1:80 through; the guard stops the relay
    # before connect(2), so nothing reaches whatever listens there.
    policy = Policy(allow=["127.0.0.0/8"], deny=["0.0.0.0/0"])
    out = replay(endpoints, policy, _case("regress-defect3-tcp-syn-to-dns-address-port-80"))
    assert not [a for a in guard.attempts if a[0] == "tcp"]
    assert [(src, sport) for src, sport, flags in _tcp_replies(out) if flags & RST] == [(DNS, 80)]


def test_defect11_syn_to_another_subnet_address_is_reset_whatever_the_policy(endpoints, guard):
    # Even a policy allowing the guest's subnet must not make 10.0.2.77 reachable; the
    # guard refuses the connect(2) to it today.
    policy = Policy(allow=["127.0.0.0/8", "10.0.2.0/24"], deny=["0.0.0.0/0"])
    out = replay(endpoints, policy, _case("regress-defect11-tcp-syn-to-other-subnet-address"))
    assert not guard.attempts
    resets = [(src, sport) for src, sport, flags in _tcp_replies(out) if flags & RST]
    assert resets == [(bytes([10, 0, 2, 77]), 80)]


def test_defect10_overlapping_fragments_around_an_empty_one_are_discarded(endpoints, guard):
    # The empty fragment discards the datagram, and its later fragments are discarded
    # with it (RFC 5722 §4), so the all-'X' pieces never form a datagram of their own.
    counters: dict = {}
    out = replay(endpoints, fuzz_policy(endpoints.ports),
                 _case("regress-defect10-zero-length-fragment-bypasses-overlap-check"),
                 counters=counters)
    assert not _echo_replies(out)
    assert counters.get("ip_reassembly_dropped", 0) >= 1, \
        f"no reassembly dropped; {len(_echo_replies(out))} echo replies to the overlapping datagram"


def test_echo_replies_fit_the_mtu(endpoints, guard):
    # A 3000-byte echo request in MTU-sized fragments (ping -s 3000) is reassembled and
    # answered; the answer must reach the guest in frames of at most 14 + MTU bytes, as
    # UDP replies do (udp.py fragments them), not as one 3034-byte frame. (The relayed
    # reply, corpus/found-...-loopback.hex, has the same fault; it is not asserted here
    # as the ICMP relay needs a ping socket or CAP_NET_RAW.)
    out = replay(endpoints, fuzz_policy(endpoints.ports),
                 _case("found-icmp-echo-reply-larger-than-mtu-gateway"))
    replies = _echo_replies(out)
    assert len(replies) == 1 or len(out) > 1, "no echo reply"
    assert max(len(f) for f in out) <= 14 + 1500, [len(f) for f in out]
