"""Every write of an SMS row's status is a move of its state machine (core.state.sms: its table, or a recovery the
writer names), made by core.state.transition: none is a raw UPDATE that the machine never checked. Read from the
source (no database)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[3]
SOURCES = ("app.py", "main.py", "admin_api", "channels", "core", "providers")
# The names the SMS table goes by in an UPDATE: the model, and its Core table (channels.sms.jobs, routes).
SMS_TABLE = {"SmsMessage", "_SMS"}


def _updated_table(node: ast.expr) -> str | None:
    """The name given to `update(...)` at the root of a method chain (update(X).where(...).values(...)), if any."""
    while True:
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id == "update" and node.args:
                first = node.args[0]
                return first.id if isinstance(first, ast.Name) else None
            node = node.func
        elif isinstance(node, ast.Attribute):
            node = node.value
        else:
            return None


def _sets_status(call: ast.Call) -> bool:
    if any(keyword.arg == "status" or keyword.arg is None for keyword in call.keywords):  # status=, or **values
        return True
    return any(not isinstance(arg, ast.Dict) or any(isinstance(key, ast.Constant) and key.value == "status"
                                                     for key in arg.keys) for arg in call.args)


def raw_status_updates() -> list[str]:
    found = []
    for source in SOURCES:
        path = ROOT / source
        for file in [path] if path.is_file() else sorted(path.rglob("*.py")):
            for node in ast.walk(ast.parse(file.read_text(), str(file))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "values"
                        and _updated_table(node.func.value) in SMS_TABLE and _sets_status(node)):
                    found.append(f"{file.relative_to(ROOT)}:{node.lineno}")
    return found


def test_no_sms_status_is_written_outside_its_state_machine() -> None:
    assert raw_status_updates() == []


def test_the_scan_sees_a_raw_status_update() -> None:
    """The check above finds what it looks for (a chain as the sender's raw UPDATEs were written)."""
    tree = ast.parse("update(SmsMessage).where(_SMS.c.id == i, moved_on).values(changes).returning(_SMS.c.id)\n"
                     "update(_SMS).values(status='QUEUED')\nupdate(OutboxJob).values(status='PENDING')\n"
                     "update(_SMS).values(provider_status=None)\n")
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "values" and _updated_table(n.func.value) in SMS_TABLE and _sets_status(n)]
    assert sorted(call.lineno for call in calls) == [1, 2]
