"""The launcher forwards SIGTERM/SIGINT to the rank processes (not to accelerate) and returns their reported code."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorabox.train.resilience.launcher import child_pids

# Stands in for `accelerate launch` with one process: like accelerate 1.15's simple_launcher it waits for its
# child, installs no signal handler (SIGTERM would kill it) and turns any failure into exit 1.
FAKE_ACCELERATE = """
import subprocess, sys
from pathlib import Path
rank = subprocess.Popen([sys.executable, sys.argv[1], sys.argv[2]])
rank.wait()
Path(sys.argv[2], "accelerate-exit").write_text(str(rank.returncode))
sys.exit(1 if rank.returncode else 0)
"""
# Stands in for a training rank: flags the signal, finishes its "step", reports through the status file.
FAKE_RANK = """
import json, os, signal, sys, time
from pathlib import Path
seen = []
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: seen.append(signum))
Path(sys.argv[1], "ready").write_text("")
while not seen:
    time.sleep(0.02)
Path(os.environ["LORABOX_STATUS_FILE"]).write_text(json.dumps({"exit_code": 128 + seen[0]}))
sys.exit(0)
"""
LAUNCH = "import sys; from lorabox.train.resilience.launcher import launch; sys.exit(launch(sys.argv[1:]))"


@pytest.mark.parametrize(("stop", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_reaches_the_rank_not_accelerate_and_its_code_comes_back(tmp_path, repo, stop, code):
    (tmp_path / "accelerate.py").write_text(FAKE_ACCELERATE)
    (tmp_path / "rank.py").write_text(FAKE_RANK)
    cmd = [sys.executable, "-c", LAUNCH, sys.executable, str(tmp_path / "accelerate.py"), str(tmp_path / "rank.py")]
    launcher = subprocess.Popen([*cmd, str(tmp_path)], cwd=repo, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline and launcher.poll() is None
        time.sleep(0.02)
    launcher.send_signal(stop)
    assert launcher.wait(timeout=30) == code
    # accelerate's stand-in was left alone and saw its rank exit 0 (the code travelled by the status file).
    assert (tmp_path / "accelerate-exit").read_text() == "0"
    assert f"{stop.name} forwarded to training process(es)" in launcher.stderr.read()


def test_without_a_report_the_child_exit_code_is_returned(repo):
    assert subprocess.run([sys.executable, "-c", LAUNCH, sys.executable, "-c", "exit(7)"], cwd=repo).returncode == 7
    killed = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    assert subprocess.run([sys.executable, "-c", LAUNCH, sys.executable, "-c", killed], cwd=repo).returncode == 137


def test_child_pids_reads_parent_ids_from_proc_stat(tmp_path):
    for pid, stat in {"12": "12 (python) S 7 12", "13": "13 (a) (b) S 7 1", "14": "14 (x) S 9 14"}.items():
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "stat").write_text(stat)
    (tmp_path / "self").mkdir()
    assert child_pids(7, proc=tmp_path) == [12, 13]
    assert child_pids(8, proc=Path(tmp_path)) == []
