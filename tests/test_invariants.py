"""tests/invariants.py, the checker the fault tests run on a database file (also a script): it can fail."""

import subprocess
import sys
from pathlib import Path

from invariants import Acknowledged, check


def test_invariants_script_reports_a_broken_file(tmp_path):
    """The checker can fail: a process whose status contradicts its steps is reported."""
    import sqlite3

    from app import create_app

    db = tmp_path / "broken.db"
    create_app({"STEPD_DB": str(db), "STEPD_TOKEN": "t"})
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute(
        "INSERT INTO processes (id, status, principal, created_at, updated_at) VALUES ('p', 'COMPLETED', 'x', 't', 't')"
    )
    conn.execute(
        "INSERT INTO steps (id, process_id, position, type, status, params, created_at)"
        " VALUES ('s', 'p', 0, 'noop', 'PENDING', '{}', 't')"
    )
    conn.close()
    script = Path(__file__).resolve().parent / "invariants.py"
    run = subprocess.run([sys.executable, str(script), str(db)], capture_output=True, text=True)
    assert run.returncode == 1
    assert "process p is COMPLETED, its steps ['PENDING'] say RUNNING" in run.stdout
    acknowledged = Acknowledged(processes={"gone"}, restarts={"ack1": "s"})
    report = check(db, acknowledged)
    assert report.lost == 2 and report.acks_checked == 2
