"""deploy/docker/build_images.sh must not leave its build lock to the dockerd it starts.

The script takes `flock` on fd 9 for the whole build; a daemon started from it used to inherit
that descriptor and hold the lock for its whole life, so the next build (`make images` then
`make test`) waited forever. This runs the real script with stand-in `docker`, `dockerd` and `id`
commands on PATH (no engine needed), then checks that the lock is free while the stand-in daemon
still runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

FAKE_DOCKER = """#!/usr/bin/env bash
# docker info answers once the stand-in daemon wrote its pid; build and inspect succeed.
case "$1" in
  info) [ -s "$FAKE_STATE/dockerd.pid" ] && kill -0 "$(cat "$FAKE_STATE/dockerd.pid")" 2>/dev/null ;;
  build) exit 0 ;;
  image) echo 1000 ;;
  *) exit 0 ;;
esac
"""

FAKE_DOCKERD = """#!/usr/bin/env bash
echo $$ > "$FAKE_STATE/dockerd.pid"
exec sleep 120
"""

FAKE_ID = """#!/usr/bin/env bash
[ "$1" = "-u" ] && { echo 0; exit 0; }
exec /usr/bin/id "$@"
"""


def _stand_ins(tmp_path: Path) -> dict:
    """The environment of a build that finds the stand-ins first on PATH (made once)."""
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    if not bin_dir.exists():
        bin_dir.mkdir()
        state.mkdir()
        for name, text in (("docker", FAKE_DOCKER), ("dockerd", FAKE_DOCKERD), ("id", FAKE_ID)):
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_STATE": str(state),
            "RETRAIN_CACHE": str(tmp_path / "cache")}


def _lock_is_free(lock: Path) -> bool:
    return subprocess.run(["flock", "-n", str(lock), "true"]).returncode == 0


def run_build(script: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess, int, Path]:
    env = _stand_ins(tmp_path)
    proc = subprocess.run(["bash", str(script), "--online", "test"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    pid_file = tmp_path / "state" / "dockerd.pid"
    pid = int(pid_file.read_text()) if pid_file.exists() else 0
    return proc, pid, tmp_path / "cache" / "docker" / "build.lock"


def _stop(pid: int) -> None:
    if pid:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def test_the_dockerd_the_build_starts_does_not_hold_the_build_lock(tmp_path):
    proc, pid, lock = run_build(REPO / "deploy" / "docker" / "build_images.sh", tmp_path)
    try:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert pid and Path(f"/proc/{pid}").exists(), "the stand-in dockerd was not started by the build"
        assert "starting dockerd" in proc.stderr
        assert _lock_is_free(lock), "the daemon started by build_images.sh holds the build lock"
        # The next build, with that daemon still up, takes the lock instead of waiting on it.
        again = subprocess.run(["bash", str(REPO / "deploy/docker/build_images.sh"), "--online", "test"], cwd=REPO,
                               env=_stand_ins(tmp_path), capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stderr[-3000:]
        assert Path(f"/proc/{pid}").exists()
    finally:
        _stop(pid)
