"""The policies `rlchat eval` compares, found in the run directory, and their models (rlchat/stages/evaluate.py
generates with them).

Discovery (`choose_policies`): the reference (sft; `base` in a run without SFT), every finished policy stage of
the run (POLICY_STAGES: ppo, grpo, rloo, dpo; each keeps its policy as a LoRA adapter or a full model under
RUN/<stage>/, named by the manifest's outputs.policy), ppo-best (RUN/ppo/best, kept by ppo --eval-every) and,
with --include-base, the starting model `base`. --policies picks some of them.

Models (`load_policies`): one model in memory for every LoRA policy trained on the reference: the reference model
with each stage's adapter loaded under the policy's name; `use(name)` switches that adapter on, and the reference
is every adapter off. A policy trained on another base, or with all weights (--full), is its own model; `base`
(when it is not the reference) is loaded a second time (the first copy has the SFT adapter merged into it).

Imports: errors, eval_report (REFERENCE_POLICY); models and run_models inside the functions.
"""
from __future__ import annotations

import contextlib

from rlchat.errors import RunDirError
from rlchat.eval_report import REFERENCE_POLICY

POLICY_STAGES = ("ppo", "grpo", "rloo", "dpo")  # stages whose output is a policy (RUN/<stage>/, outputs.policy)
POLICY_ORDER = ("base", "sft", "ppo", "ppo-best", "grpo", "rloo", "dpo")  # report order
SAMPLING_STAGES = ("ppo", "grpo", "rloo")  # RL stages that sampled at a temperature (the KL's temperature)


class Policies:
    """The models of a run's policies (module docstring): `ref_model` is the reference's (the SFT policy, or the
    starting model in a run without SFT); `shared` a PeftModel on it holding the adapters {policy: adapter name};
    `own` {policy: model} for policies with a model of their own; `base_model` the starting model when it is
    not the reference."""

    def __init__(self, ref_model, tokenizer, reference: str = REFERENCE_POLICY, shared=None,
                 adapters: dict | None = None, own: dict | None = None, base_model=None):
        self.ref_model = ref_model
        self.tokenizer = tokenizer
        self.reference = reference
        self.shared = shared
        self.adapters = adapters or {}
        self.own = own or {}
        self.base_model = base_model

    @contextlib.contextmanager
    def use(self, name: str):
        if name == self.reference:
            if self.shared is None:
                yield self.ref_model
            else:
                with self.shared.disable_adapter():
                    yield self.shared
        elif name in self.own:
            yield self.own[name]
        elif name in self.adapters:
            self.shared.set_adapter(self.adapters[name])
            yield self.shared
        else:  # base, when it is not the reference
            yield self.base_model


def finished_policies(run) -> list[str]:
    """The policies of the run's finished policy stages, ppo-best included when ppo kept one, in POLICY_ORDER."""
    found = set()
    for stage in POLICY_STAGES:
        rec = run.record(stage) or {}
        if rec.get("status") == "done":
            found.add(stage)
            if stage == "ppo" and (rec.get("outputs") or {}).get("best"):
                found.add("ppo-best")
    return [p for p in POLICY_ORDER if p in found]


def choose_policies(run, cfg, reference: str = REFERENCE_POLICY) -> list[str]:
    """The policies to evaluate, in POLICY_ORDER; RunDirError when one asked for is not in the run. The reference
    (sft, or base in a run without SFT) is evaluated unless --policies leaves sft out."""
    from rlchat.run_models import starting_model

    trained = finished_policies(run)
    wanted = set(cfg.policies or [reference, *trained])
    for name in sorted(wanted - set(trained) - {"sft", "base"}, key=POLICY_ORDER.index):
        if name == "ppo-best" and "ppo" in trained:
            raise RunDirError(f"policy 'ppo-best' was asked for but the ppo stage in {run.path} kept no best "
                              "policy (it ran without --eval-every)",
                              f"rerun `rlchat ppo --run-dir {run.path} --eval-every 10 --overwrite`, or leave "
                              "ppo-best out of --policies")
        stage = "ppo" if name == "ppo-best" else name
        rec = run.record(stage)
        status = rec.get("status") if rec else "not run"
        raise RunDirError(f"policy '{name}' was asked for but the {stage} stage in {run.path} is {status}",
                          f"finish the {stage} stage first (its command with --run-dir {run.path}), or leave "
                          f"{name} out of --policies")
    if "sft" in wanted and reference != "sft":
        raise RunDirError(f"policy 'sft' was asked for but {run.path} has no sft stage (its stages started from "
                          f"{starting_model(run)})", "leave sft out of --policies: that starting model is the "
                          "policy 'base' here")
    if cfg.include_base or reference == "base":
        wanted.add("base")
    return [p for p in POLICY_ORDER if p in wanted]


def kl_temperature(run) -> float:
    """The temperature the run's RL stage sampled at (ppo, else grpo, else rloo: its manifest config), at which the
    KL to the reference is estimated; 1.0 when none did (dpo does not sample)."""
    for stage in SAMPLING_STAGES:
        rec = run.record(stage) or {}
        if rec.get("status") == "done":
            return float((rec.get("config") or {}).get("temperature") or 1.0)
    return 1.0


def load_policies(run, cfg, policies: list[str], start_spec: str | None = None) -> Policies:
    """The models of `policies` on the device. In a run without SFT the starting model (start_spec) takes the SFT
    policy's place, as the reference `base`."""
    from rlchat import models
    from rlchat.run_models import Base, base_model_spec, load_base_causal, load_ppo_policy, load_sft_policy

    device = models.pick_device()
    if start_spec:
        ref_model, tokenizer = load_base_causal(run, Base(start_spec, None, None), cfg.trust_remote_code)
        ref_model.eval().to(device)
    else:
        ref_model, tokenizer = load_sft_policy(run.path, trust_remote_code=cfg.trust_remote_code, device=device)
    reference = "base" if start_spec else REFERENCE_POLICY
    pol = Policies(ref_model, tokenizer, reference)
    for name in policies:
        if name in (reference, "base"):
            continue
        stage, which = ("ppo", "best") if name == "ppo-best" else (name, "policy")
        model, shared = load_ppo_policy(run, ref_model, cfg.trust_remote_code, which, loaded_base=start_spec,
                                        stage=stage, onto=pol.shared, name=name)
        if shared:  # an adapter on the reference model, switched on for this policy only
            pol.shared, pol.adapters[name] = model, name
        else:
            pol.own[name] = model.to(device)
    if pol.shared is not None:
        pol.shared.to(device)
    if "base" in policies and not start_spec:
        pol.base_model = models.load_causal_lm(base_model_spec(run), trust_remote_code=cfg.trust_remote_code,
                                               device=device)
        models.align_model_with_tokenizer(pol.base_model, tokenizer)
        pol.base_model.eval()
    return pol
