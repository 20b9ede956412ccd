"""The systemd packaging in systemd/: the unit, sysusers, tmpfiles and logrotate files.

The checks that need systemd's own tools (systemd-analyze, systemd-sysusers, systemd-tmpfiles,
logrotate) skip, saying which tool is missing, on machines without them; the rest always run.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD_DIR / "msgd.service"
SYSUSERS = SYSTEMD_DIR / "msgd.sysusers.conf"
TMPFILES = SYSTEMD_DIR / "msgd.tmpfiles.conf"
LOGROTATE = SYSTEMD_DIR / "msgd.logrotate"

CONFIG = "/etc/msgd/msgd.toml"
GRACE_PERIOD = 30.0  # msgd's default daemon.grace_period
MAX_EXPOSURE = 2.0
TIMEOUT = 60  # seconds for any one tool run: a hang fails the test instead of blocking CI
# Where distributions keep their unit files; verify needs them to resolve the unit's
# dependencies (sysinit.target, network-online.target, ...).
SYSTEM_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed on this machine")
    return path


def run(
    *args: str | os.PathLike[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [os.fspath(a) for a in args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        check=False,
    )


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file, each a list of (key, value) in order: keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"{path.name}:{number}: continuation lines not expected"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{path.name}:{number}: not KEY=VALUE: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def service() -> dict[str, str]:
    """The [Service] section, the last assignment of each key winning (as in systemd)."""
    return dict(parse_unit(UNIT)["Service"])


def all_values(key: str) -> list[str]:
    return [v for k, v in parse_unit(UNIT)["Service"] if k == key]


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}


def seconds(span: str) -> float:
    """A systemd time span ("45s", "1min 30s", "90") in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span)
    assert parts and "".join(n + u for n, u in parts) == span.replace(" ", ""), span
    return sum(float(n) * _UNITS[u or "s"] for n, u in parts)


def exec_paths() -> list[str]:
    """The programs the unit runs (ExecStart=, ExecReload=, ...), without systemd's prefixes."""
    paths = []
    for key, value in parse_unit(UNIT)["Service"]:
        if key.startswith("Exec") and value:
            paths.append(value.lstrip("@-:+!").split()[0])
    return paths


# -- systemd-analyze -------------------------------------------------------------------------------


INSTALLED_UNIT = "/etc/systemd/system/msgd.service"


def fake_root(tmp_path: Path, unit_text: str | None = None) -> Path:
    """A root holding the unit as installed on a host where msgd is installed.

    `systemd-analyze verify` checks that every Exec*= program exists and is executable, and
    msgd is not installed on a development machine or in CI. Rather than verify an edited copy
    of the unit (whose paths would then not be the ones shipped), the unit is verified as it
    is, with --root pointing at a directory that holds executable stubs at exactly the unit's
    Exec paths. With --root, verify also looks every unit up under that directory, the one it
    is asked about included (a path given on the command line is taken inside the root too),
    so the unit is copied unchanged to where it is installed, and the host's own unit files
    are copied in to let its dependencies (sysinit.target, network-online.target, ...) resolve
    as on a real host. (--man=no only skips the Documentation= man page check; neither it nor
    --generators=no helps with the missing programs.)
    """
    units = next((d for d in SYSTEM_UNIT_DIRS if d.is_dir()), None)
    if units is None:
        pytest.skip("no systemd unit directory on this machine to resolve dependencies with")
    root = tmp_path / "root"
    shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True)
    installed = root / INSTALLED_UNIT.lstrip("/")
    installed.parent.mkdir(parents=True, exist_ok=True)
    installed.write_text(UNIT.read_text() if unit_text is None else unit_text)
    for program in exec_paths():
        assert program.startswith("/"), f"Exec path must be absolute: {program}"
        stub = root / program.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    return root


def verify(root: Path) -> str:
    """Everything verify says about the installed unit, and its exit status if not 0.

    verify exits 0 after warnings (unknown keys, bad values), so its output is what counts.
    """
    analyze = tool("systemd-analyze")
    result = run(analyze, "verify", "--man=no", f"--root={root}", INSTALLED_UNIT)
    return (result.stdout + result.stderr).strip() + (
        "" if result.returncode == 0 else f"\n(exit status {result.returncode})"
    )


def test_verify_prints_nothing(tmp_path: Path) -> None:
    assert verify(fake_root(tmp_path)) == ""


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ("bogus key", "Unknown key 'NoSuchSetting'"),
        ("missing program", "is not executable"),
    ],
)
def test_verify_harness_catches_mistakes(tmp_path: Path, change: str, complaint: str) -> None:
    """The fake root must not hide real mistakes: a broken copy of the unit is reported."""
    text = UNIT.read_text()
    if change == "bogus key":
        text = text.replace("[Service]\n", "[Service]\nNoSuchSetting=yes\n", 1)
    root = fake_root(tmp_path, text)
    if change == "missing program":
        (root / exec_paths()[0].lstrip("/")).unlink()
    assert complaint in verify(root)


def security_report(unit: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    analyze = tool("systemd-analyze")
    result = run(analyze, "security", "--offline=true", "--no-pager", unit)
    found = re.search(
        rf"Overall exposure level for {re.escape(unit.name)}: (\d+(?:\.\d+)?)", result.stdout
    )
    assert found, f"no overall exposure line in:\n{result.stdout}\n{result.stderr}"
    return float(found.group(1)), result


def test_security_exposure_is_low() -> None:
    exposure, result = security_report(UNIT)
    assert result.returncode == 0, result.stderr
    # Warnings (unknown keys, bad values: settings silently ignored) go to stderr.
    assert result.stderr.strip() == ""
    assert exposure <= MAX_EXPOSURE, result.stdout


def test_security_exposure_reacts_to_hardening(tmp_path: Path) -> None:
    """The parsed figure is the real one: a copy without its sandboxing scores far worse."""
    sandbox = (
        "User",
        "CapabilityBoundingSet",
        "SystemCallFilter",
        "ProtectSystem",
        "PrivateUsers",
        "PrivateDevices",
        "RestrictNamespaces",
    )
    bare = tmp_path / UNIT.name
    bare.write_text(
        "".join(
            line
            for line in UNIT.read_text().splitlines(keepends=True)
            if not line.startswith(sandbox)
        )
    )
    exposure, _ = security_report(bare)
    assert exposure > MAX_EXPOSURE + 3


# -- the unit's settings ---------------------------------------------------------------------------


def test_unit_lifecycle_settings() -> None:
    s = service()
    assert s["Type"] == "notify"
    assert s["NotifyAccess"] == "main"  # workers and handler commands may not notify
    assert s["ExecStart"] == f"/usr/bin/msgd -c {CONFIG}"
    reload = s["ExecReload"].split()
    assert reload[0].endswith("/msgctl") and reload[-1] == "reload", s["ExecReload"]
    assert reload[1:3] == ["-c", CONFIG]
    if s["PrivateUsers"] == "yes" and s["ProtectProc"] != "default":
        # ExecReload= then cannot see msgd in /proc: systemd must vouch for the pid.
        assert reload[3:5] == ["--main-pid", "$MAINPID"], s["ExecReload"]
    assert s["KillMode"] == "mixed"
    assert seconds(s["TimeoutStopSec"]) > GRACE_PERIOD
    assert seconds(s["WatchdogSec"]) > 0
    assert s["Restart"] == "on-failure"


def test_unit_identity_and_files() -> None:
    s = service()
    assert (s["User"], s["Group"]) == ("msgd", "msgd")
    assert s["UMask"] == "0077"
    assert s["RuntimeDirectory"] == "msgd"
    assert s["LogsDirectory"] == "msgd"
    assert s["ProtectSystem"] == "strict"
    assert all_values("CapabilityBoundingSet") == [""]
    assert s["NoNewPrivileges"] == "yes"
    assert s["MemoryDenyWriteExecute"] == "yes"
    families = set(s["RestrictAddressFamilies"].split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6"}


def test_unit_covers_msgd_default_paths() -> None:
    """msgd's default pidfile, stats file and spool are all writable under the unit."""
    config = pytest.importorskip("msgd.config")
    d = config.DaemonConfig()
    s = service()
    runtime = Path("/run") / s["RuntimeDirectory"]
    assert Path(d.pidfile).parent == runtime
    assert Path(d.stats_file).parent == runtime
    writable = [Path(p.lstrip("-")) for v in all_values("ReadWritePaths") for p in v.split()]
    assert Path(d.spool) in writable


def tmpfiles_lines() -> list[list[str]]:
    lines = []
    for raw in TMPFILES.read_text().splitlines():
        if raw.strip() and not raw.lstrip().startswith("#"):
            lines.append(raw.split())
    return lines


def test_tmpfiles_creates_every_writable_path() -> None:
    """ReadWritePaths= must exist before the unit starts (or namespace set-up fails)."""
    made = {fields[1]: fields for fields in tmpfiles_lines()}
    for value in all_values("ReadWritePaths"):
        for path in value.split():
            assert path in made, f"{path} is in ReadWritePaths= but not in msgd.tmpfiles.conf"
            kind, _, mode, user, group, age = made[path][:6]
            assert (kind, mode, user, group, age) == ("d", "0700", "msgd", "msgd", "-")


# -- sysusers and tmpfiles -------------------------------------------------------------------------


def test_sysusers_dry_run(tmp_path: Path) -> None:
    sysusers = tool("systemd-sysusers")
    # The config must be named by an absolute path: relative ones are taken inside --root.
    result = run(sysusers, "--dry-run", f"--root={tmp_path}", SYSUSERS)
    assert result.returncode == 0, result.stderr
    assert "Creating user 'msgd'" in result.stderr + result.stdout
    assert "ignoring" not in result.stderr


def test_sysusers_then_tmpfiles_in_a_scratch_root(tmp_path: Path) -> None:
    """Install both into an empty root, in the order the README gives, and look at the result.

    systemd-tmpfiles 252 has no --dry-run, so it really creates the spool, under tmp_path.
    Changing its owner needs root: elsewhere the tmpfiles lines get a format check only.
    """
    sysusers = tool("systemd-sysusers")
    tmpfiles = tool("systemd-tmpfiles")
    if os.geteuid() != 0:
        for fields in tmpfiles_lines():
            assert len(fields) in (6, 7) and fields[0] in {"d", "D", "v", "q", "Q"}, fields
            assert fields[1].startswith("/") and re.fullmatch(r"0[0-7]{3}", fields[2]), fields
        pytest.skip("systemd-tmpfiles --create needs root to chown; format checked only")
    (tmp_path / "etc").mkdir()
    result = run(sysusers, f"--root={tmp_path}", SYSUSERS)
    assert result.returncode == 0, result.stderr
    passwd = {
        line.split(":")[0]: line.split(":")
        for line in (tmp_path / "etc/passwd").read_text().splitlines()
    }
    _, _, uid, gid, _, home, shell = passwd["msgd"]
    groups = {
        line.split(":")[0]: line.split(":")[2]
        for line in (tmp_path / "etc/group").read_text().splitlines()
    }
    assert groups["msgd"] == gid
    assert int(uid) < 1000, "msgd must be a system user"
    assert shell.endswith("nologin") and not Path(home).is_relative_to("/home")

    result = run(tmpfiles, f"--root={tmp_path}", "--create", TMPFILES)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""
    for fields in tmpfiles_lines():
        st = (tmp_path / fields[1].lstrip("/")).stat()
        assert stat.S_ISDIR(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o700
        assert (st.st_uid, st.st_gid) == (int(uid), int(gid))


# -- logrotate -------------------------------------------------------------------------------------


def postrotate_script(text: str) -> str:
    found = re.search(r"^\s*postrotate\s*$(.*?)^\s*endscript\s*$", text, re.M | re.S)
    assert found, "msgd.logrotate has no postrotate ... endscript block"
    return found.group(1)


def test_logrotate_reloads_msgd() -> None:
    text = LOGROTATE.read_text()
    assert text.lstrip().startswith("/var/log/msgd/*.log {") or re.search(
        r"^/var/log/msgd/\*\.log\s*\{", text, re.M
    )
    script = postrotate_script(text)
    assert re.search(rf"msgctl\s+-c\s+{re.escape(CONFIG)}\s+reload\b", script), script
    for directive in ("missingok", "notifempty", "compress", "delaycompress", "sharedscripts"):
        assert re.search(rf"^\s*{directive}\s*$", text, re.M), directive


def logrotate_copy(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The logrotate file with its paths and user moved into tmp_path (nothing else changed)."""
    logs = tmp_path / "log"
    logs.mkdir(mode=0o700)
    pidfile = tmp_path / "msgd.pid"
    me = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    group = subprocess.run(["id", "-gn"], capture_output=True, text=True, check=True).stdout
    text = LOGROTATE.read_text()
    for old, new in (
        ("/var/log/msgd/", f"{logs}/"),
        ("/run/msgd/msgd.pid", str(pidfile)),
        ("msgd msgd", f"{me} {group.strip()}"),
    ):
        assert old in text, f"msgd.logrotate no longer mentions {old!r}: update this test"
        text = text.replace(old, new)
    conf = tmp_path / "msgd.logrotate"
    conf.write_text(text)
    conf.chmod(0o644)  # logrotate ignores group- or world-writable configs
    return conf, logs, pidfile


def test_logrotate_debug_run_passes(tmp_path: Path) -> None:
    logrotate = tool("logrotate")
    conf, logs, _ = logrotate_copy(tmp_path)
    (logs / "msgd.log").write_text("a line\n")
    result = run(logrotate, "-d", "-s", tmp_path / "state", conf)
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr.lower(), result.stderr


def stub(path: Path, calls: Path, status: int) -> None:
    """An executable that appends its name and arguments to `calls` and exits `status`."""
    path.write_text(f'#!/bin/sh\necho "{path.name} $*" >> {calls}\nexit {status}\n')
    path.chmod(0o755)


@pytest.mark.parametrize(
    ("case", "expected_calls", "status"),
    [
        ("running", [f"msgctl -c {CONFIG} reload"], 0),
        ("stopped", [], 0),
        # msgctl refuses to HUP with an invalid config on disk: msgd is HUPed anyway, so that it
        # reopens its log, and logrotate reports the failure.
        (
            "config rejected",
            [
                f"msgctl -c {CONFIG} reload",
                "systemctl kill --kill-whom=main --signal=SIGHUP msgd.service",
            ],
            1,
        ),
    ],
)
def test_logrotate_forced_run(
    tmp_path: Path, case: str, expected_calls: list[str], status: int
) -> None:
    """A real (forced) rotation in tmp_path, with stubs for msgctl and systemctl on PATH."""
    logrotate = tool("logrotate")
    conf, logs, pidfile = logrotate_copy(tmp_path)
    (logs / "msgd.log").write_text("a line\n")
    if case != "stopped":
        pidfile.write_text("12345\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    stub(bin_dir / "msgctl", calls, 1 if case == "config rejected" else 0)
    stub(bin_dir / "systemctl", calls, 0)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = run(logrotate, "-f", "-s", tmp_path / "state", conf, env=env)
    assert result.returncode == status, result.stderr
    assert (logs / "msgd.log.1").read_text() == "a line\n"
    assert (logs / "msgd.log").exists()  # `create`: msgd reopens an existing, empty file
    assert (calls.read_text().splitlines() if calls.exists() else []) == expected_calls
