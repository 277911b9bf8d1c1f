"""What a DP round costs this site, and when it refuses one: the ClientApp's side of the privacy
ledger (docs/dp.md §7). :func:`check_round` decides at the setup, :func:`charge_round` pays before
the site trains; both refuse with a one-line :class:`~fedseal.client.policy.SiteRefusal`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fedseal.client.policy import SitePrivacy, SiteRefusal

if TYPE_CHECKING:
    from fedseal.client.flower_app import SiteRuntime
    from fedseal.client.privacy_ledger import PrivacyLedger
    from fedseal.privacy import Budget
    from fedseal.protocol.dp import DpParams
    from fedseal.protocol.messages import RoundSetup

__all__ = ["budget_refusal", "charge_round", "check_round", "honest_sites"]

log = logging.getLogger("fedseal.client")


def charge_round(
    runtime: SiteRuntime, run_id: bytes, round_: int, dp: DpParams, *, honest_sites: int
) -> None:
    """Pay for DP round ``round_`` of ``run_id`` before its noised input exists.

    The rule (docs/dp.md §7): every DP round the site takes part in is charged to its
    ledger, once per (run, round) (a retry or re-setup of a round already paid for
    charges nothing more), whatever ``[privacy] dp`` says; ``dp = "off"`` only means
    rounds *without* DP are accepted too. With ``[privacy] epsilon_budget`` the charge
    is refused when it would take ε (all runs together, at ``[privacy] delta``) past the
    budget; without one it is recorded and never refused. With no ledger (a runtime built
    without one, e.g. embedded in a test): a site with a budget refuses every DP round (it
    could not enforce the budget); a site without one takes part uncharged.

    ``honest_sites``: the honest survivors this site counts on (its own colluding
    fraction); the ledger charges for the fewer of these and the round's own count.

    Charge, then send: the charge is on disk before the site trains, so a crash or a
    failed training afterwards loses budget, never privacy. :func:`check_round` makes
    the same decision at the setup, before any key leaves the site.

    Raises:
        SiteRefusal: Past the budget, the ledger is unreadable or cannot be written, or a
            budget without a ledger; nothing was charged.
    """
    from fedseal.client.privacy_ledger import BudgetExceededError, LedgerError

    ledger, budget = _ledger_or_refuse(runtime, round_)
    if ledger is None:
        return
    try:
        charge = ledger.charge_round(run_id, round_, dp, honest_sites=honest_sites, budget=budget)
    except BudgetExceededError as exc:
        raise budget_refusal(exc.spent, exc.after, exc.budget) from exc
    except LedgerError as exc:  # unreadable ledger, or a round without privacy
        raise SiteRefusal(str(exc)) from exc
    except OSError as exc:
        raise SiteRefusal(
            f"privacy ledger {ledger.path} cannot be written ({exc.strerror or exc}): "
            "the round is not sent unpaid"
        ) from exc
    spent = "no epsilon budget set" if budget is None else (
        f"epsilon {ledger.spent(budget.delta):.4g} of {budget.epsilon:g} spent"
    )
    log.info("round %d: charged rho %.4g to the privacy ledger (%s)", round_, charge.rho, spent)


def check_round(
    runtime: SiteRuntime, run_id: bytes, round_: int, dp: DpParams, *, honest_sites: int
) -> None:
    """Refuse at the setup a DP round :func:`charge_round` would refuse, so the site
    leaves before its key advert (the coordinator starts a new setup attempt without it)
    instead of dropping out at the masked input. Charges nothing; a round of the run
    already charged is left to the charge (a retry is free).

    Raises:
        SiteRefusal: As :func:`charge_round`.
    """
    from fedseal.client.privacy_ledger import LedgerError, dp_round_noise
    from fedseal.privacy import epsilon, round_rho

    ledger, budget = _ledger_or_refuse(runtime, round_)
    if ledger is None or budget is None:
        return
    try:
        rho = round_rho(dp_round_noise(dp, honest_sites=honest_sites))
        charges = ledger.charges()
    except LedgerError as exc:
        raise SiteRefusal(str(exc)) from exc
    if any((c.run_id, c.round) == (run_id.hex(), round_) for c in charges):
        return
    rhos = [c.rho for c in charges]
    after = epsilon([*rhos, rho], budget.delta)
    if after > budget.epsilon:
        raise budget_refusal(epsilon(rhos, budget.delta), after, budget)


def _ledger_or_refuse(runtime: SiteRuntime, round_: int) -> tuple[PrivacyLedger | None, Budget | None]:
    """The ledger and budget a DP round is charged with (``None``: uncharged)."""
    budget = runtime.privacy.budget()
    if runtime.ledger is None:
        if budget is not None:
            raise SiteRefusal(
                f"privacy budget: [privacy] epsilon_budget {budget.epsilon:g} is set but this "
                "site runs without a privacy ledger to charge the round to"
            )
        log.warning("round %d: a DP round taken part in uncharged (no privacy ledger)", round_)
    return runtime.ledger, budget


def budget_refusal(spent: float, after: float, budget: Budget) -> SiteRefusal:
    """The one-line refusal of a DP round past the site's budget."""
    return SiteRefusal(
        f"privacy budget: epsilon {spent:.4g} of {budget.epsilon:g} spent at delta "
        f"{budget.delta:g}; this round would bring it to {after:.4g} "
        "([privacy] epsilon_budget, all runs together)"
    )


def honest_sites(privacy: SitePrivacy, setup: RoundSetup) -> int:
    """The honest survivors this site counts on in ``setup``: its ``min_survivors`` less the
    colluders the site's own ``max_colluding_fraction`` allows in the cohort."""
    from fedseal.protocol.params import colluders

    cohort = len(setup.cohort)
    return setup.params.min_survivors - colluders(cohort, privacy.max_colluding_fraction)
