"""The models of a run, loaded from its run directory: every stage gets them from here (stages never import
each other).

- `load_sft_policy(run_dir)`: the SFT policy of a run, as written by `rlchat.stages.sft`:

      RUN/run.json   stages.sft.status == "done"; stages.sft.outputs ==
                     {"kind": "lora" | "full", "adapter": "sft/adapter" | null, "model": "sft/model" | null,
                      "tokenizer": "sft/tokenizer", "base_model": <spec of the base model>}
      RUN/sft/adapter/    PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)   kind "lora"
      RUN/sft/model/      full model (config.json + model.safetensors)                          kind "full"
      RUN/sft/tokenizer/  tokenizer files

  It returns the base model with the adapter merged in (`merge_and_unload`), or the full model, plus the
  tokenizer from RUN/sft/tokenizer. Paths in `outputs` are relative to RUN. A relative `base_model` path is
  resolved from the current directory (as the SFT stage saw it), then from RUN's parent.
- `resolve_base(run, model_spec)` -> `Base`: where a stage's backbone comes from (--model, or the run's finished
  SFT stage), with a content hash; `load_base_causal(run, base)`: that base as a causal LM (SFT adapter merged).
- `load_reward_model(run_path)`: the run's finished reward stage as a sequence classifier (LoRA on its recorded
  base, checked by `check_reward_base`, or a full model); `RewardScorer` scores (prompt, completion) with any
  sequence-classification reward model (the only reward-model scorer: the reward stage, `rlchat score`, PPO's
  text reward models and eval all use it); `load_run_reward_scorer(run, ...)` is eval's (None without a reward
  stage).
- `load_ppo_policy(run, sft_model)`: the run's finished PPO (`stage=`: grpo, rloo, dpo) policy, a LoRA adapter on
  the SFT-merged base (`onto=`: added by name to a PeftModel) or a full model; `ppo_policy_dir`, `attach_ppo` are
  its parts. `base_model_spec(run)`: the model SFT started from.
- `standalone_sft_dir(run)` / `adapter_base_name(run, model)`: the SFT policy as a plain model directory
  (RUN/sft/model, or RUN/sft/merged after LoRA SFT), which adapters trained on it name as their
  `base_model_name_or_path` (absolute), so stock peft loads them offline.

Heavy libraries are imported inside the functions, so importing this module is cheap.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlchat.errors import ModelError, RunDirError, first_line

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

REWARD_STAGE = "reward"


# ------------------------------------------------------------------------------------------- the SFT policy


def manifest_path(run_path: str | Path, rel: str) -> Path:
    """A path recorded in the manifest (relative to RUN), resolved; RunDirError if it leads outside the run
    directory (a hand-edited or foreign run.json must not make a stage read or write elsewhere)."""
    from rlchat.rundir import RunDir

    try:
        return RunDir(run_path).resolve_inside(rel)
    except RunDirError:
        raise RunDirError(f"{Path(run_path) / 'run.json'} names {rel}, which points outside the run directory",
                          "restore run.json, or rerun the stage that wrote it with --overwrite") from None


def _sft_record(run_path: Path) -> dict:
    """The manifest entry of a finished sft stage."""
    from rlchat.rundir import RunDir

    return RunDir(run_path).require_done("sft", f"run `rlchat sft --run-dir {run_path}` first")


def sft_base_spec(sft_rec: dict) -> str | None:
    """The model spec an SFT stage started from, as its manifest entry records it (outputs.base_model, else
    config.model); `resolve_base_spec` makes it loadable from here."""
    return (sft_rec.get("outputs") or {}).get("base_model") or (sft_rec.get("config") or {}).get("model")


def resolve_base_spec(run_path: str | Path, base: str | None) -> str:
    """The SFT base model spec as loadable now: a relative path missing from the current directory is looked up
    beside the run directory; Hub ids pass through."""
    run_path = Path(run_path)
    if not base:
        raise RunDirError(f"the sft entry in {run_path / 'run.json'} names no base model (outputs.base_model)",
                          "run `rlchat sft` again for this run directory (with --overwrite)")
    from rlchat.models import is_local

    path = Path(base).expanduser()
    if is_local(base) and not path.is_absolute() and not path.exists():
        beside = run_path.parent / path
        if beside.exists():
            return str(beside)
    return base


def load_sft_policy(run_dir_path: str | Path, trust_remote_code: bool = False, dtype: Any = None,
                    device: str | None = None) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """(model, tokenizer) of a finished SFT stage: base + merged LoRA adapter, or the full SFT model.

    See the module docstring for the RUN/ layout it reads. The model comes back in eval mode.
    """
    from rlchat import models

    run_path = Path(run_dir_path).expanduser()
    rec = _sft_record(run_path)
    outputs = rec.get("outputs") or {}
    kind = outputs.get("kind")
    fix = "run `rlchat sft` again for this run directory (with --overwrite)"
    if kind not in ("lora", "full"):
        raise RunDirError(f"the sft entry in {run_path / 'run.json'} has outputs.kind {kind!r}, "
                          "expected 'lora' or 'full'", fix)
    # every path the manifest names is checked (inside RUN, files whole) before anything is loaded
    tok_dir = manifest_path(run_path, outputs.get("tokenizer") or "sft/tokenizer")
    weights_dir = manifest_path(run_path, outputs.get("model") or "sft/model") if kind == "full" else \
        manifest_path(run_path, outputs.get("adapter") or "sft/adapter")
    if kind == "lora":
        if not (weights_dir / "adapter_config.json").is_file():
            raise RunDirError(f"SFT adapter not found: {weights_dir} has no adapter_config.json", fix)
        models.read_json_object(weights_dir / "adapter_config.json", fix)
    models.check_weights(weights_dir, f"{fix}; a finished stage keeps no resumable state")
    tokenizer = models.load_tokenizer(str(tok_dir), trust_remote_code=trust_remote_code)

    if kind == "full":
        model = models.load_causal_lm(str(weights_dir), trust_remote_code=trust_remote_code, dtype=dtype)
    else:
        adapter_dir = weights_dir
        base = resolve_base_spec(run_path, sft_base_spec(rec))
        try:
            model = merge_sft_adapter(base, adapter_dir, tokenizer, trust_remote_code, dtype)
        except ModelError as err:
            raise ModelError(f"cannot load the base model of the SFT adapter in {run_path}: {err.problem}",
                             f"{err.fix}; the adapter must be applied to the model SFT trained on") from None
        except Exception as err:
            raise ModelError(f"could not apply the SFT adapter {adapter_dir} to base model {base}: "
                             f"{first_line(err)}", "check that the base model is the one SFT trained on; "
                             f"{fix}") from None
    models.align_model_with_tokenizer(model, tokenizer)
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


# ------------------------------------------------------------------------------------------------------ base


@dataclass
class Base:
    """Where a stage's backbone comes from."""

    name: str                # "sft" or the --model spec
    hash: str | None         # content hash of the SFT adapter/model dir, or of a local --model dir
    path: Path | None        # the hashed directory


def sft_weights_dir(run, rec: dict) -> Path:
    """The directory of a finished SFT stage's adapter (kind "lora") or model (kind "full"), checked to exist."""
    outputs = rec.get("outputs") or {}
    rel = outputs.get("adapter") if outputs.get("kind") == "lora" else outputs.get("model")
    if not rel:
        raise RunDirError(f"the sft entry in {run.manifest_path} names no adapter or model directory",
                          "rerun `rlchat sft` for this run directory with --overwrite")
    path = manifest_path(run.path, rel)
    if not path.is_dir():
        raise RunDirError(f"SFT weights not found at {path}", "rerun `rlchat sft` for this run directory with "
                          "--overwrite, or pass --model to train the reward model from another model")
    return path


def resolve_base(run, model_spec: str | None) -> Base:
    """The base a stage starts from: --model if given, else the run's finished SFT stage."""
    from rlchat.fileio import content_hash

    if model_spec:
        local = Path(model_spec).expanduser()
        if local.exists():
            return Base(model_spec, content_hash(local), local)
        return Base(model_spec, None, None)
    rec = run.require_done("sft", "train the SFT model first (`rlchat sft --run-dir RUN ...`), or pass --model to "
                                  "start the reward model from any causal LM")
    path = sft_weights_dir(run, rec)
    return Base("sft", content_hash(path), path)


def load_base_causal(run, base: Base, trust_remote_code: bool = False):
    """(causal LM, tokenizer) of the base: the SFT policy (adapter merged) or the --model."""
    from rlchat import models

    if base.name == "sft":
        return load_sft_policy(run.path, trust_remote_code=trust_remote_code)
    tokenizer = models.load_tokenizer(base.name, trust_remote_code=trust_remote_code)
    model = models.load_causal_lm(base.name, trust_remote_code=trust_remote_code)
    models.align_model_with_tokenizer(model, tokenizer)
    return model, tokenizer


def starting_model(run) -> str | None:
    """In a run without an SFT stage: the --model that the finished ppo (else reward) stage started from, as its
    outputs record it (`base`), or None when neither stage did."""
    for stage in ("ppo", "grpo", "rloo", "dpo", "reward"):
        rec = run.record(stage) or {}
        base = (rec.get("outputs") or {}).get("base")
        if rec.get("status") == "done" and base and base != "sft":
            return base
    return None


def base_model_spec(run) -> str:
    """The base model the SFT stage started from (manifest sft outputs.base_model or config.model), loadable now."""
    return resolve_base_spec(run.path, sft_base_spec(run.record("sft") or {}))


def merge_sft_adapter(base_spec: str, adapter_dir: Path, tokenizer, trust_remote_code: bool = False,
                      dtype: Any = None) -> "PreTrainedModel":
    """The base model with the SFT LoRA adapter merged in (the embeddings grown first if SFT added tokens)."""
    from peft import PeftModel

    from rlchat import models

    model = models.load_causal_lm(base_spec, trust_remote_code=trust_remote_code, dtype=dtype)
    # SFT may have grown the vocabulary (a new pad token): the adapter then holds the bigger embeddings.
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()


def standalone_sft_dir(run) -> Path | None:
    """The finished SFT policy as a plain model directory (absolute), or None for a run that has none:
    RUN/sft/model (--full) or RUN/sft/merged (LoRA: the base with the adapter merged, written by the sft stage)."""
    outputs = (run.record("sft") or {}).get("outputs") or {}
    rel = outputs.get("model") if outputs.get("kind") == "full" else outputs.get("merged")
    if not rel:
        return None
    path = manifest_path(run.path, rel)
    return path.resolve() if (path / "config.json").is_file() else None


def adapter_base_name(run, model_spec: str | None) -> str:
    """What an adapter trained in this run records as `base_model_name_or_path`, so that peft's
    AutoPeftModel*.from_pretrained(adapter) finds its base offline: --model (absolute when local), else the
    standalone SFT model (`standalone_sft_dir`). "sft" only for a run made before rlchat wrote RUN/sft/merged."""
    from rlchat import models

    if model_spec:
        return str(Path(model_spec).expanduser().resolve()) if models.is_local(model_spec) else model_spec
    path = standalone_sft_dir(run)
    return str(path) if path is not None else "sft"


# ------------------------------------------------------------------------------------------- the reward model


def reward_record(run) -> dict:
    """The manifest entry of the run's finished reward stage; RunDirError if it is not done or malformed."""
    rec = run.require_done(REWARD_STAGE, "train the reward model first: `rlchat train-reward --run-dir RUN "
                                         "--dataset PAIRS`")
    outputs = rec.get("outputs") or {}
    if outputs.get("kind") not in ("lora", "full"):
        raise RunDirError(f"the reward entry in {run.manifest_path} has outputs.kind {outputs.get('kind')!r}, "
                          "expected 'lora' or 'full'", "rerun `rlchat train-reward` with --overwrite")
    return rec


def check_reward_base(run_path: str | Path) -> Base:
    """The base a LoRA reward adapter was trained on, checked against the run as it is now.

    Raises ModelError when the SFT model (or the local --model directory) changed since the reward model was
    trained: the adapter would then sit on weights it was not trained with; or when the reward adapter or the SFT
    weights are damaged (a .safetensors file cut short). Returns the Base.
    """
    from rlchat import models
    from rlchat.rundir import RunDir

    run = RunDir(run_path)
    outputs = reward_record(run)["outputs"]
    # damaged files first: a cut-short adapter must not load, and a damaged SFT file would read as "changed"
    models.check_weights(manifest_path(run.path, outputs.get("adapter") or "reward/adapter"),
                         f"rerun `rlchat train-reward --run-dir {run.path} --dataset PAIRS --overwrite`; a finished "
                         "stage keeps no resumable state")
    name, recorded = outputs.get("base"), outputs.get("base_hash")
    base = resolve_base(run, None if name == "sft" else (outputs.get("base_path") or name))
    if name == "sft" and base.path is not None:
        models.check_weights(base.path, f"rerun `rlchat sft --run-dir {run.path} --overwrite`, then train-reward "
                                        "with --overwrite; a finished stage keeps no resumable state")
    if recorded is not None and base.hash != recorded:
        what = "the run's SFT model" if name == "sft" else f"the model at {name}"
        raise ModelError(f"the reward adapter in {run.stage_dir(REWARD_STAGE)} was trained on a different version "
                         f"of {what} (hash {recorded[:19]}..., now {str(base.hash)[:19]}...)",
                         f"retrain it: rlchat train-reward --run-dir {run.path} --dataset PAIRS --overwrite")
    return base


def load_reward_model(run_path: str | Path, trust_remote_code: bool = False, device: str | None = None
                      ) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """(sequence-classification reward model in eval mode, tokenizer) of a run's finished reward stage.

    LoRA: base (SFT merged, or the recorded --model) -> seq_cls_from_causal -> PeftModel.from_pretrained(
    RUN/reward/adapter), after checking the base's content hash (ModelError on a mismatch). Full: the saved model.
    The tokenizer is RUN/reward/tokenizer, right-padded.
    """
    from rlchat import models
    from rlchat.rundir import RunDir

    run = RunDir(run_path)
    outputs = reward_record(run)["outputs"]
    full = outputs["kind"] == "full"
    base = None if full else check_reward_base(run.path)  # before loading anything
    weights = manifest_path(run.path, (outputs.get("model") or "reward/model") if full
                                   else (outputs.get("adapter") or "reward/adapter"))
    models.check_weights(weights, f"rerun `rlchat train-reward --run-dir {run.path} --dataset PAIRS --overwrite`; "
                                  "a finished stage keeps no resumable state")
    tok_dir = manifest_path(run.path, outputs.get("tokenizer") or "reward/tokenizer")
    tokenizer = models.load_tokenizer(str(tok_dir), trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "right"
    again = "rerun `rlchat train-reward` with --overwrite"
    if full:
        from transformers import AutoModelForSequenceClassification

        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(weights), use_safetensors=True, trust_remote_code=trust_remote_code,
                dtype=models.resolve_dtype(None), **models.load_kwargs())
        except Exception as err:  # noqa: BLE001 - transformers raises many types; one line for the user
            raise ModelError(f"could not load the reward model from {weights}: {str(err).splitlines()[0]}",
                             again) from None
    else:
        if not (weights / "adapter_config.json").is_file():
            raise RunDirError(f"reward adapter not found: {weights} has no adapter_config.json", again)
        causal, _ = load_base_causal(run, base, trust_remote_code)
        model = models.seq_cls_from_causal(causal, pad_token_id=tokenizer.pad_token_id)
        del causal
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(weights))
        except Exception as err:  # noqa: BLE001
            raise ModelError(f"could not apply the reward adapter {weights}: {str(err).splitlines()[0]}",
                             again) from None
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


def reward_input_ids(tokenizer, prompt: Any, completion: Any, max_length: int | None,
                     keep: str = "last") -> tuple[list[int], bool]:
    """Token ids of prompt + completion as a reward model sees them, and whether they were truncated.

    Same rendering as TRL's RewardTrainer: messages through the chat template; plain text concatenated with the
    eos token appended (only implicit plain-text pairs reach that: pairs.read_pairs reads explicit plain-text
    pairs as chats, rlchat/one_turn.py). Longer than max_length: keep="last" drops the first tokens (the reward stage's rule: the
    score head reads the final token), keep="first" drops the last ones.
    """
    if isinstance(completion, list):
        messages = list(prompt or []) + list(completion)
        ids = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        # ChatML-style templates (Qwen, SmolLM2, rlchat's default) render "<|im_end|>\n" after the answer. PPO reads
        # the reward at the response's last token, its EOS, so the reward model must be trained and queried there
        # too, not on the newline the template adds after it.
        eos_id = tokenizer.eos_token_id
        if isinstance(eos_id, int) and eos_id in ids:
            ids = ids[:len(ids) - ids[::-1].index(eos_id)]
    else:
        text = (prompt or "") + completion
        eos = tokenizer.eos_token
        if eos and not text.endswith(eos):
            text += eos
        ids = tokenizer(text)["input_ids"]
    ids = list(ids)
    if max_length is not None and len(ids) > max_length:
        return (ids[-max_length:] if keep == "last" else ids[:max_length]), True
    return ids, False


class RewardScorer:
    """Scores (prompt, completion) pairs with a sequence-classification reward model: raw scores, (B,) float32 on
    the CPU. Inputs are built by `reward_input_ids` (truncated to `max_length`, keeping the `keep` end), batched
    (in the order given, or sorted by length when `sort_by_length`: less padding for many sequences of mixed
    lengths) and right-padded like TRL's collator (positions start at 0 on the first real token, as in reward
    training); the classifier reads the last non-pad token. The batching changes scores only in the last bits of
    float32 (row order and padding width change the kernels' summation order)."""

    def __init__(self, model, tokenizer, batch_size: int = 16, max_length: int | None = None, keep: str = "last",
                 sort_by_length: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.keep = keep
        self.sort_by_length = sort_by_length

    def __call__(self, prompts: list, completions: list) -> "torch.Tensor":
        """Scores of prompt + completion; prompts are chat messages (or text), a completion a string (the
        assistant's answer) or a list of messages."""
        ids = [reward_input_ids(self.tokenizer, prompt, _as_turn(prompt, completion), self.max_length, self.keep)[0]
               for prompt, completion in zip(prompts, completions)]
        return self.score_ids(ids)

    def score_ids(self, ids: list[list[int]]) -> "torch.Tensor":
        """Reward of each token sequence (B,), float32 on CPU, in the order given."""
        import torch

        from rlchat.generation import right_pad

        self.model.eval()
        device = next(self.model.parameters()).device
        scores = torch.empty(len(ids), dtype=torch.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i])) if self.sort_by_length else list(range(len(ids)))
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                input_ids, mask = right_pad([ids[i] for i in idx], self.tokenizer.pad_token_id, device)  # (B, T)
                logits = self.model(input_ids=input_ids, attention_mask=mask.long(), use_cache=False).logits  # (B, 1)
                scores[idx] = logits[:, 0].float().cpu()
        return scores


def _as_turn(prompt: Any, completion: Any) -> Any:
    """A completion string after chat-message prompts becomes the assistant's turn."""
    if isinstance(completion, str) and isinstance(prompt, list):
        return [{"role": "assistant", "content": completion}]
    return completion


def load_run_reward_scorer(run, batch_size: int, device: str | None = None, trust_remote_code: bool = False
                           ) -> RewardScorer | None:
    """The run's reward model as a RewardScorer, truncating to the reward stage's max_length as it trained; None
    when the run has no finished reward stage."""
    rec = run.record(REWARD_STAGE)
    if not rec or rec.get("status") != "done":
        return None
    model, tokenizer = load_reward_model(run.path, trust_remote_code=trust_remote_code, device=device)
    model.requires_grad_(False)
    return RewardScorer(model, tokenizer, batch_size, max_length=(rec.get("config") or {}).get("max_length"),
                        sort_by_length=True)


# ------------------------------------------------------------------------------------------- the PPO policy


def ppo_policy_dir(run, rec: dict, which: str = "policy", stage: str = "ppo") -> Path:
    """RUN/<stage>/policy (or what the manifest's outputs.policy says), checked to hold an adapter or a model;
    which="best": RUN/ppo/best, the best policy by held-out score (ppo --eval-every)."""
    outputs = rec.get("outputs") or {}
    if which == "best" and not outputs.get("best"):
        raise RunDirError(f"the ppo stage in {run.path} kept no best policy (it ran without --eval-every)",
                          f"rerun `rlchat ppo --run-dir {run.path} --eval-every 10 --overwrite`, or use the final "
                          "policy (ppo)")
    rel = outputs.get(which) or f"{stage}/{which}"
    path = run.resolve_inside(rel)
    if not (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise RunDirError(f"the {stage} policy {path} has no adapter_config.json or config.json",
                          f"rerun the {stage} stage of {run.path} with --overwrite")
    return path


def attach_ppo(sft_model, policy_dir: Path, trust_remote_code: bool = False, onto=None, name: str = "default"):
    """(model, shared): the PPO policy. A LoRA adapter goes on the SFT-merged model (shared=True) as adapter `name`
    (into `onto`, a PeftModel on it, when given); a full model directory is loaded on its own (shared=False)."""
    from rlchat import models

    if (policy_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        models.check_weights(policy_dir, "rerun ppo for this run directory with --overwrite; a finished stage keeps "
                                         "no resumable state")
        try:
            if onto is not None:
                onto.load_adapter(str(policy_dir), adapter_name=name)
            model = onto or PeftModel.from_pretrained(sft_model, str(policy_dir), adapter_name=name)
        except Exception as err:  # noqa: BLE001
            raise RunDirError(f"could not apply the adapter {policy_dir} to the SFT model: {first_line(err)}",
                              "rerun that stage for this run directory with --overwrite") from None
        model.eval()
        return model, True
    model = models.load_causal_lm(str(policy_dir), trust_remote_code=trust_remote_code)
    model.eval()
    return model, False


def load_ppo_policy(run, sft_model, trust_remote_code: bool = False, which: str = "policy",
                    loaded_base: str | None = None, stage: str = "ppo", onto=None, name: str = "default"):
    """(model, shared) of the run's finished PPO (or `stage`) policy (see `attach_ppo`); which="best": RUN/ppo/best.

    PPO records the base its adapter sits on (outputs.base: "sft" or a --model spec, and base_hash). On "sft" the
    adapter goes on `sft_model`, after checking that the SFT weights are the ones PPO trained on; on another base,
    that model is loaded and the adapter goes on it (a second model in memory), unless `sft_model` already is that
    base (`loaded_base`: its spec; eval of a run without SFT).
    """
    rec = run.record(stage) or {}
    outputs = rec.get("outputs") or {}
    policy_dir = ppo_policy_dir(run, rec, which, stage)
    if not (policy_dir / "adapter_config.json").is_file():  # a full model (--full): no base needed
        return attach_ppo(sft_model, policy_dir, trust_remote_code)
    base_name = outputs.get("base") or "sft"
    base = resolve_base(run, None if base_name == "sft" else base_name)
    recorded = outputs.get("base_hash")
    if recorded and base.hash and base.hash != recorded:
        what = "the run's SFT model" if base_name == "sft" else f"the model at {base_name}"
        raise ModelError(f"the {stage} adapter in {policy_dir} was trained on a different version of {what} "
                         f"(hash {recorded[:19]}..., now {base.hash[:19]}...)",
                         f"rerun the {stage} stage: its command with --run-dir {run.path} --overwrite")
    if base_name == "sft" or base_name == loaded_base:
        return attach_ppo(sft_model, policy_dir, trust_remote_code, onto, name)
    other, _ = load_base_causal(run, base, trust_remote_code)
    model, _ = attach_ppo(other, policy_dir, trust_remote_code)
    return model, False
