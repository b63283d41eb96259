"""Every USSD screen, declared as data; the text of each lives in the locale catalogs."""

from __future__ import annotations

from channels.ussd import flows as f
from channels.ussd.engine import Confirm, End, Engine, Input, Menu, Option, Screen

_SCREENS: tuple[Screen, ...] = (
    Menu("home", "home.title", args=f.home_args, options=(
        Option("menu.pay", f.pay),
        Option("menu.my", f.my_payments),
        Option("menu.dsp", f.problem),
        Option("menu.lang", "language"),
        Option("menu.help", f.help_),
    )),
    Menu("resume", "resume.title", remember=False, options=(
        Option("resume.continue", f.resume_continue),
        Option("resume.restart", f.resume_restart),
    )),
    Menu("coop_pick", "coop.pick", items=f.coop_items, on_item=f.coop_chosen),
    Menu("language", "lang.title", remember=False, options=tuple(
        Option(f"lang.{lang}", handler) for lang, handler in f.LANGUAGE_HANDLERS.items())),
    # Registration of a phone that belongs to no cooperative.
    Input("reg_code", "reg.code", validate=f.validate_code, on_valid=f.code_entered,
          error="reg.code_unknown"),
    Input("reg_name", "reg.name", validate=f.validate_name, on_valid=f.name_entered, error="reg.name_invalid",
          args=f.coop_args),
    End("reg_closed", "reg.closed", args=f.coop_args),
    # The code of a cooperative that is not active (suspended): it exists, and takes nothing now.
    End("reg_suspended", "reg.suspended"),
    End("reg_done", "reg.done", args=f.reg_args),
    End("reg_exists", "reg.exists", args=f.coop_args),
    # A number of another country than the cooperative's (a Ghanaian one typing a Rwandan cooperative's code): none
    # of its wallets could ever take her payment.
    End("reg_foreign", "reg.foreign", args=f.coop_args),
    # The same on the shared code, where no cooperative is of her number's country: none could take her payment.
    End("reg_foreign_any", "reg.foreign_any"),
    End("member_pending", "member.pending", args=f.coop_args),
    End("member_none", "member.none"),
    End("member_not_here", "member.not_here", args=f.coop_args),
    End("member_not_here_office", "member.not_here_office", args=f.coop_args),  # no registration by phone there
    # Her membership or her cooperative is suspended: paying cannot work until the cooperative acts.
    End("member_inactive", "member.inactive", args=f.coop_args),
    # Her number was changed (NEW_SIM, a typo corrected, released) while this session of the old one was open.
    End("number_changed", "member.number_changed"),
    # Pay.
    Menu("pay_type", "pay.types", items=f.type_items, on_item=f.type_chosen),
    End("pay_none", "pay.none", args=f.coop_args),
    # The type's period is paid in full already: Back to the list (the footer), or pay it again. Neither on the back
    # stack nor resumed (service.NO_RESUME): a serve of the previous release knows no such screen.
    Menu("pay_paid", "pay.paid", args=f.paid_args, options=(Option("pay.paid_again", f.pay_again),),
         remember=False),
    Input("pay_amount", "pay.amount", validate=f.validate_amount, on_valid=f.amount_entered,
          error="pay.amount_invalid", args=f.amount_args),
    Menu("pay_method", "pay.method", items=f.method_items, on_item=f.method_chosen),
    End("pay_no_method", "pay.no_method", args=f.coop_args),
    # The number's methods all refuse this amount by their rule (M-Pesa: whole shillings), not the number.
    End("pay_amount_no_method", "pay.amount_no_method", args=f.amount_no_method_args),
    Confirm("pay_confirm", "pay.confirm", on_confirm=f.confirmed, on_cancel="pay_cancelled",
            args=f.confirm_args),
    End("pay_done", "pay.done", args=f.done_args),
    # What a resumed confirmation's earlier payment became: paid already, or closed without being paid.
    End("pay_already", "pay.already", args=f.done_args),
    End("pay_not_completed", "pay.not_completed", args=f.done_args),
    # Confirmed while an open payment of the same type and amount waits for her (or for the provider): none made.
    End("pay_waiting", "pay.waiting", args=f.waiting_args),
    End("pay_cancelled", "pay.cancelled"),
    # The type confirmed was closed, repriced, or its balance paid meanwhile (flows.TypeChanged): nothing charged.
    End("pay_type_gone", "pay.type_gone", args=f.type_changed_args),
    End("pay_type_changed", "pay.type_changed", args=f.type_changed_args),
    # My payments.
    Menu("my_list", "my.title", items=f.payment_items, on_item=f.payment_chosen),
    End("my_none", "my.none"),
    Menu("my_detail", "my.detail", args=f.detail_args, options=(Option("my.receipt", f.send_receipt),)),
    End("my_receipt_sent", "my.receipt_sent", args=f.done_args),
    # A payment that holds no money (failed, pending, ...): its status is what an SMS can tell, not a receipt.
    Menu("my_detail_status", "my.detail", args=f.detail_args, options=(Option("my.status_sms", f.send_receipt),)),
    End("my_status_sent", "my.status_sent", args=f.done_args),
    # Problem with a payment.
    Menu("dsp_pick", "dsp.pick", items=f.payment_items, on_item=f.payment_chosen),
    Menu("dsp_reason", "dsp.reason", options=tuple(
        Option(f"reason.{reason}", handler) for reason, handler in f.REASON_HANDLERS.items())),
    End("dsp_done", "dsp.done", args=f.done_args),
    End("dsp_exists", "dsp.exists", args=f.done_args),
    # Help.
    End("help", "help.text", args=f.help_args),
    End("help_office", "help.office", args=f.help_args),
    End("help_general", "help.general"),
    End("failed", "error.generic"),
)

SCREENS: dict[str, Screen] = {screen.id: screen for screen in _SCREENS}


def build_engine() -> Engine:
    return Engine(SCREENS, home="home")
