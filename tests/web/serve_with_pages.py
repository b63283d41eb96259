"""`main.py run` with the web pages and the SMS simulator wired in, while app.py does not do it itself."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import app
import main
from admin_api.pages import setup_pages

_create_app = app.create_app


def missing_parts(application) -> tuple[bool, bool]:  # type: ignore[no-untyped-def]
    """(pages missing, SMS simulator missing) on an application built by app.create_app."""
    paths = {resource.canonical for resource in application.router.resources()}
    return "/ops" not in paths, not any(p.startswith("/_sim/africastalking") for p in paths)


def create_app(settings, *, runtime=None):  # type: ignore[no-untyped-def]
    application = _create_app(settings, runtime=runtime)
    no_pages, no_sms = missing_parts(application)
    if no_pages:
        setup_pages(application)
    if no_sms and settings.simulators_in_process:
        from channels.sms.simulator import simulator_from_settings

        application.add_subapp("/_sim/africastalking", simulator_from_settings(settings))
    return application


app.create_app = create_app

if __name__ == "__main__":
    sys.exit(main.main(sys.argv[1:]))
