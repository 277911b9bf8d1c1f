"""The names of the Flower records, record keys and message actions the coordinator's
``ServerApp`` (:mod:`fedseal.server.flower_app`) and the sites' ``ClientApp``
(:mod:`fedseal.client.flower_app`) exchange: one definition for both adapters.

A message's content is a Flower ``RecordDict``: records by name (``ArrayRecord``,
``ConfigRecord``, ``MetricRecord``), each a mapping of keys to values. Pure names, no Flower
import (this is the sans-IO protocol layer)::

    message             record                          keys
    query.initial_model CONFIG_RECORD                   MODEL, SEED
      reply             ARRAYS_RECORD                   (the model's arrays by name)
    query.ping          CONFIG_RECORD                   PING
      reply             SITE_RECORD                     SITE
    query.policy        (empty)
      reply             POLICY_RECORD                   SITE, MIN_COHORT, ALLOW_PLAIN, DP_REQUIRED,
                                                        CONTRACT
    train               ARRAYS_RECORD, CONFIG_RECORD    the training config (below; with the
                                                        run's data contract: RUN_CONTRACT)
      reply             ARRAYS_RECORD, METRICS_RECORD   NUM_EXAMPLES, TRAIN_LOSS
                        SITE_RECORD                     DATASET_ROOT (hex), SITE
    train.secagg        SETUP_RECORD                    PAYLOAD (a signed protocol message)
                        (setup: + ARRAYS_RECORD, CONFIG_RECORD)
      reply             SETUP_RECORD                    PAYLOAD
                        BULK_RECORD                     BULK_MASKED (masked-input stage)
    evaluate            ARRAYS_RECORD, CONFIG_RECORD    (the training config, RUN_CONTRACT as for
                                                        train; + SETUP_RECORD, SETUP_CONFIG_RECORD:
                                                        the next round's setup rides along)
      reply             METRICS_RECORD                  NUM_EXAMPLES, LOSS, ACCURACY, MACRO_F1
                        or EVALUATION_REFUSED_RECORD    REASON
                        (+ SETUP_RECORD or SETUP_ERROR_RECORD: REASON)

A site's Flower error reply whose reason starts with :data:`REFUSED_PREFIX` refuses the
message (policy, not a fault).
"""

from __future__ import annotations

__all__ = [
    "ACCURACY",
    "ALLOW_PLAIN",
    "ARRAYS_RECORD",
    "BATCH_SIZE",
    "BULK_MASKED",
    "BULK_RECORD",
    "CLIP_NORM",
    "CONFIG_RECORD",
    "CONTRACT",
    "DATASET_ROOT",
    "DP_REQUIRED",
    "EPOCHS",
    "EVALUATION_REFUSED_RECORD",
    "INITIAL_MODEL",
    "LEARNING_RATE",
    "LOSS",
    "MACRO_F1",
    "METRICS_RECORD",
    "MIN_COHORT",
    "MODEL",
    "NUM_EXAMPLES",
    "PAYLOAD",
    "PING",
    "POLICY",
    "POLICY_RECORD",
    "PROXIMAL_MU",
    "REASON",
    "REFUSED_PREFIX",
    "ROUND",
    "RUN_CONTRACT",
    "RUN_ID",
    "SECURE_STAGE",
    "SEED",
    "SETUP_CONFIG_RECORD",
    "SETUP_ERROR_RECORD",
    "SETUP_RECORD",
    "SITE",
    "SITE_RECORD",
    "TRAIN_LOSS",
    "message_type",
]

# -- message actions (``<category>.<action>``; Flower's categories: query, train, evaluate) ----

INITIAL_MODEL = "initial_model"
"""``query.initial_model``: build the configured model from the run's seed, return its weights."""
PING = "ping"
"""``query.ping``: is the site reachable (after a coordinator restart)."""
POLICY = "policy"
"""``query.policy``: the site's policy floor (what rounds it accepts), asked at a run's start so
the coordinator can refuse a run no site would take part in."""
SECURE_STAGE = "secagg"
"""``train.secagg``: one stage of a secure round."""


def message_type(category: str, action: str | None = None) -> str:
    """A Flower message type: ``category`` alone or ``category.action`` (``query.ping``)."""
    return category if action is None else f"{category}.{action}"


# -- records ------------------------------------------------------------------------------

ARRAYS_RECORD = "arrays"
"""The model's arrays by name (the global model, or a site's weights / initial model)."""
CONFIG_RECORD = "config"
"""The coordinator's config of a message (training config keys below)."""
METRICS_RECORD = "metrics"
"""A reply's metrics (training or evaluation)."""
SITE_RECORD = "site"
"""Who answered: a plain training reply's dataset root and a ping reply's site name."""
SETUP_RECORD = "secagg"
"""The protocol message (:data:`PAYLOAD`) of every ``train.secagg`` message and reply, and of an
``evaluate`` message (and its reply) that also carries the next round's setup."""
SETUP_CONFIG_RECORD = "train-config"
"""In an ``evaluate`` message carrying the next round's setup: that round's training config."""
SETUP_ERROR_RECORD = "secagg-error"
"""In an ``evaluate`` reply: why the site refused the setup it carried (:data:`REASON`)."""
EVALUATION_REFUSED_RECORD = "evaluation-refused"
"""In an ``evaluate`` reply without metrics: why the site did not evaluate (:data:`REASON`)."""
POLICY_RECORD = "policy"
"""A ``query.policy`` reply: the site's floor (:data:`MIN_COHORT`, :data:`ALLOW_PLAIN`,
:data:`DP_REQUIRED`, ints; :data:`SITE`) and its dataset's data contract (:data:`CONTRACT`)."""
BULK_RECORD = "bulk"
"""In a masked-input reply: the masked vector (:data:`BULK_MASKED`) beside the envelope."""

# -- record keys --------------------------------------------------------------------------

PAYLOAD = "payload"
REASON = "reason"
BULK_MASKED = "masked"
SITE = "site"
DATASET_ROOT = "dataset-root"
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
LOSS = "loss"
ACCURACY = "accuracy"
MACRO_F1 = "macro-f1"
MIN_COHORT = "min-cohort"
ALLOW_PLAIN = "allow-plain"
DP_REQUIRED = "dp-required"
CONTRACT = "contract"
"""The data contract the site's dataset was prepared under: its digest as 64 hex characters,
``""`` for none (:mod:`fedseal.protocol.contract`)."""

# Training config (CONFIG_RECORD / SETUP_CONFIG_RECORD)
RUN_ID = "run-id"
"""The run id, 32 hex characters."""
ROUND = "round"
EPOCHS = "epochs"
BATCH_SIZE = "batch-size"
LEARNING_RATE = "learning-rate"
CLIP_NORM = "clip-norm"
MODEL = "model"
SEED = "seed"
PROXIMAL_MU = "proximal-mu"
"""FedProx only: the sites add the proximal term to their local loss."""
RUN_CONTRACT = "data-contract"
"""The run's data contract (``server.toml [run] contract``): its digest as 64 hex characters;
absent when the run declares none. A site refuses a plain ``train`` or an ``evaluate`` naming
another contract than its dataset's, or none when its dataset has one (a secure round's setup
carries the digest signed instead)."""

REFUSED_PREFIX = "refused:"
"""A site's error reply whose reason starts with this refuses the message (policy, not a fault)."""
