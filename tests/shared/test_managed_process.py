"""A process the tests start dies with the test process, however that ends (a killed pytest must
not leave Celery workers consuming the next run's queues)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support import REPO_ROOT, alive, wait_until

SPAWN_AND_DIE = """
import os
from tests.support import ManagedProcess
child = ManagedProcess(["sleep", "60"], {}, "sleeper")
print(child.process.pid, flush=True)
os._exit(0)
"""


def test_a_managed_process_dies_when_the_test_process_is_gone() -> None:
    spawner = subprocess.run([sys.executable, "-c", SPAWN_AND_DIE], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    child_pid = int(spawner.stdout.split()[0])
    wait_until(lambda: not alive(child_pid), 10, "the orphaned child to end")
