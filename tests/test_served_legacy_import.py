"""A delegate module written `from delegates import delegate` (the import stepd taught before it
was one package) still loads under `stepd serve`, and the service's log says once, naming the
file, that the import is deprecated (not once per worker and runner process)."""

from helpers import wait_for

OLD_STYLE = "from delegates import delegate\n\n\n@delegate('old.style')\ndef old(ctx):\n    return {'ran': 1}\n"


def test_the_old_import_runs_and_is_said_once(server_factory, tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "legacy.py").write_text(OLD_STYLE)
    server = server_factory(db_path=tmp_path / "old.db", delegates=folder, workers=2, runners=2).start()
    process = server.start_process(("old.style", {}))
    done = server.wait_process(process["processId"], "COMPLETED")
    assert done["steps"][0]["result"]["ran"]["longValue"] == 1
    wait_for(lambda: "deprecated" in server.output(), what="the deprecation line")
    lines = [line for line in server.output().splitlines() if "deprecated" in line]
    assert len(lines) == 1, lines
    assert str(folder / "legacy.py") in lines[0] and "from stepd import delegate" in lines[0]
