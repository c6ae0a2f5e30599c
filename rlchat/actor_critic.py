"""The four PPO roles (policy, reference, value, reward) behind one interface, `ActorCritic`, and their builders.

Two ways to hold the four roles PPO needs (both subclass `ActorCritic`, so the PPO loop does not care which):

* `SharedBase` (the default): ONE causal LM in memory with three LoRA adapters,
      policy     = base + adapter "policy"  (trainable; peft initialises LoRA B = 0, so it starts equal to the ref)
      reference  = base with no adapter     (peft's "__base__" row name)
      value      = base + adapter "value" + a scalar `value_head` on the last hidden state (trainable)
      reward     = base + adapter "reward" + the reward model's `score` head (frozen), when the run's reward model
                   is a LoRA adapter on this same base
  Memory is one model plus adapters. The rollout pass sends all roles through the backbone at once: rows are
  stacked along the batch and every LoRA layer applies the right adapter to each row (peft's mixed-adapter batch,
  `adapter_names=`), so one forward pass gives logprobs, reference logprobs, values and reward scores. Training
  runs one role per pass (policy, then value), each followed by its backward, so at most one role's activations
  are held for the backward. With `shared_critic=True` there is no value adapter: the value head reads the
  policy's hidden states and one training pass serves both (half the update compute).
* `SeparateModels` (`--separate-models`, and the `--full` policy): policy, reference, value and reward are
  separate models, each run on its own. It uses about four times the memory; it is the baseline of the
  memory benchmark and the only way to train all weights.

Either way the value and reward heads read the backbone's last hidden state; only the policy and reference rows go
through the LM head, and only at the response positions.

Shapes: B batch, P prompt (left padded), R response (right padded after the first EOS), T = P + R, H hidden,
V vocabulary. Position t of every (B, R) tensor belongs to response token t; its logprob and its value come from
the hidden state at sequence position P + t - 1 (the state that predicted the token).

    model = build_shared(base_lm, lora_config, reward_parts, temperature)
    response_ids = model.generate(prompt_ids, prompt_mask, generation_config(...))         # (B, R)
    rollout = score_rollout(model, prompt_ids, prompt_mask, response_ids, stop_ids, pad_id)  # rlchat/rollout.py
    new_logprobs = model(rollout.input_ids, rollout.attention_mask, rollout.response_ids, "policy")  # (B, R) grads
    new_values = model(rollout.input_ids, rollout.attention_mask, rollout.response_ids, "value")     # (B, R) grads

Not here: the `Rollout` and the rollout pass (rlchat/rollout.py), generation helpers (rlchat/generation.py),
reward functions and text reward models (rlchat/rewards.py), the PPO math (rlchat/ppo_math.py), the loop
(rlchat/stages/ppo.py).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn

from rlchat.generation import position_ids_from_mask
from rlchat.ppo_math import entropy_from_logits, logprobs_from_logits

POLICY, VALUE, REWARD = "policy", "value", "reward"  # adapter names (and the roles they serve)
NO_ADAPTER = "__base__"  # the reference role: the base with no adapter (peft's row name for it)
POLICY_AND_VALUE = "policy+value"  # one training pass for both (shared critic: the value head on the policy)


# ------------------------------------------------------------------------------------------------- the models


def make_head(hidden_size: int, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              dtype: torch.dtype = torch.float32) -> nn.Linear:
    """A scalar head Linear(H, 1). From `weight` (1, H) (and `bias`) when given, e.g. a reward model's `score`;
    else zeros, so a fresh value head predicts 0 everywhere at the start."""
    head = nn.Linear(hidden_size, 1, bias=bias is not None, dtype=dtype)
    with torch.no_grad():
        if weight is None:
            head.weight.zero_()
        else:
            head.weight.copy_(weight.reshape(1, hidden_size))
        if bias is not None:
            head.bias.copy_(bias.reshape(1))
    return head


class ActorCritic(nn.Module):
    """The four PPO roles behind one interface. Subclasses provide `_hidden` / `_hidden_one` / `_lm_head`.

    `forward` (the training pass, the one `accelerator.prepare` wraps) returns one role's output: the current
    policy's logprobs or the value head's values; `score` (no grad) returns everything a rollout needs; `generate`
    samples from the policy. The module stays in eval mode throughout (dropout off, as PPO needs); gradients flow.
    """

    value_head: nn.Linear
    reward_head: nn.Linear | None
    shared_critic = False  # True: the value head reads the policy's hidden states (no value adapter)
    has_critic = True  # False (grpo/rloo): no value model; the frozen zero head's values are 0 and never saved

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature
        self.gradient_checkpointing = False

    # -- subclass hooks
    def _hidden(self, roles: list[str], input_ids, attention_mask, position_ids) -> list[torch.Tensor]:
        """Last hidden states (B, T, H) of the backbone for each role in `roles`, same inputs for all (no grad)."""
        raise NotImplementedError

    def _hidden_one(self, role: str, input_ids, attention_mask, position_ids) -> torch.Tensor:
        """Last hidden states (B, T, H) for one role, with gradients (the training pass)."""
        raise NotImplementedError

    def _lm_head(self, role: str) -> nn.Module:
        raise NotImplementedError

    def _logit_fn(self, role: str, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits (..., V) from hidden states, with the model's final logit soft-capping if it has one."""
        shape = hidden.shape[:-1]
        # a 2-D matmul: a sliced 3-D input made autograd keep a batch-expanded copy of the weight
        logits = self._lm_head(role)(hidden.reshape(-1, hidden.shape[-1])).view(*shape, -1)  # (..., V)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _values(self, hidden: torch.Tensor) -> torch.Tensor:
        """The value head on hidden states (..., H) -> (...,) float32; the head is float32 on any weights' dtype."""
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

    @property
    def has_reward(self) -> bool:
        return self.reward_head is not None

    def policy_generator(self):
        """The object whose `.generate` samples from the policy (a PeftModel with the policy adapter active)."""
        raise NotImplementedError

    # -- the three calls the PPO loop makes
    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, generation_config) -> torch.Tensor:
        """Sample responses from the policy: (B, P) left-padded prompts -> (B, R') response tokens, R' <= the
        max_new_tokens of `generation_config` (generation stops once every row has produced an EOS)."""
        gen = self.policy_generator()
        out = gen.generate(input_ids=prompt_ids, attention_mask=prompt_mask.long(),
                           generation_config=generation_config)
        return out[:, prompt_ids.shape[1]:]  # (B, R')

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_ids: torch.Tensor,
                role: str = POLICY) -> torch.Tensor:
        """Training pass for ONE role: the current policy's logprobs (role "policy") or values (role "value"), (B, R).

        input_ids, attention_mask: (B, T) = prompt + response; response_ids: (B, R), the last R tokens of input_ids.
        One role per pass (and its backward before the next pass) keeps the activation memory at one model's,
        and lets a checkpointed backward recompute with the same adapter. With a shared critic (the value head on
        the policy's hidden states) role "policy+value" returns (logprobs, values) from one pass.
        """
        R = response_ids.shape[1]
        P = input_ids.shape[1] - R
        position_ids = position_ids_from_mask(attention_mask)
        backbone_role = POLICY if (self.shared_critic or role == POLICY_AND_VALUE) else role
        hidden = self._hidden_one(backbone_role, input_ids, attention_mask, position_ids)[:, P - 1:-1]  # (B, R, H)
        if role == VALUE:
            return self._values(hidden)  # (B, R)
        logits = self._logit_fn(POLICY, hidden)  # (B, R, V) only where the response is predicted
        logprobs = logprobs_from_logits(logits, response_ids, self.temperature)  # (B, R)
        if role == POLICY_AND_VALUE:
            assert self.shared_critic, "one pass for policy and value needs the value head on the policy"
            return logprobs, self._values(hidden)  # (B, R), (B, R)
        return logprobs

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_ids: torch.Tensor,
              last_index: torch.Tensor, extra: int = 0) -> dict[str, torch.Tensor | None]:
        """Rollout pass (no grad): logprobs, ref_logprobs, values, entropy (B, R) and model_scores (B,) or None.

        last_index: (B,) position in input_ids of each response's last real token; the reward head reads it.
        extra: columns appended after the response for the reward read only (an EOS after a response cut at the
        length limit, see rollout.score_rollout); causal attention leaves every earlier position unchanged.
        """
        R = response_ids.shape[1]
        P = input_ids.shape[1] - R - extra
        position_ids = position_ids_from_mask(attention_mask)
        roles = [POLICY, NO_ADAPTER] + ([] if self.shared_critic else [VALUE]) + ([REWARD] if self.has_reward else [])
        hidden = dict(zip(roles, self._hidden(roles, input_ids, attention_mask, position_ids)))
        if extra:
            hidden = {role: (h if role == REWARD else h[:, :P + R]) for role, h in hidden.items()}
        # one (B, R, V) logits tensor at a time keeps the peak memory at one of them
        logits = self._logit_fn(POLICY, hidden[POLICY][:, P - 1:-1])  # (B, R, V)
        logprobs = logprobs_from_logits(logits, response_ids, self.temperature)  # (B, R)
        entropy = entropy_from_logits(logits.float() / self.temperature)  # (B, R)
        del logits
        ref_logits = self._logit_fn(NO_ADAPTER, hidden[NO_ADAPTER][:, P - 1:-1])  # (B, R, V)
        ref_logprobs = logprobs_from_logits(ref_logits, response_ids, self.temperature)  # (B, R)
        del ref_logits
        critic = hidden[POLICY if self.shared_critic else VALUE]
        values = self._values(critic[:, P - 1:-1])  # (B, R)
        model_scores = None
        if self.has_reward:
            rows = torch.arange(input_ids.shape[0], device=input_ids.device)
            last_hidden = hidden[REWARD][rows, last_index]  # (B, H)
            model_scores = self.reward_head(last_hidden).squeeze(-1).float()  # (B,)
        return dict(logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, entropy=entropy,
                    model_scores=model_scores)

    # -- gradient checkpointing without train mode
    def _checkpointing_layers(self) -> list[nn.Module]:
        from transformers.modeling_layers import GradientCheckpointingLayer

        return [m for m in self.modules() if isinstance(m, GradientCheckpointingLayer)]

    def enable_gradient_checkpointing(self, models: list) -> None:
        """Recompute each decoder layer's activations in backward (less memory). transformers only checkpoints
        layers in training mode; `_hidden_one` flips just the layers' own `training` flag (not their children's, so
        dropout stays off) while a training pass runs with gradients."""
        for m in models:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.gradient_checkpointing = True

    def _set_checkpoint_mode(self, on: bool) -> None:
        if not self.gradient_checkpointing:
            return
        for layer in self._checkpointing_layers():
            layer.training = on  # deliberately not .train(): children (attention, dropout) stay in eval mode


def _backbone(lm) -> nn.Module:
    """The decoder stack under an ...ForCausalLM (`model.model` for Llama/Qwen2, `model.transformer` for GPT-2)."""
    return getattr(lm, lm.base_model_prefix)


@contextmanager
def row_adapters(peft_model, names: list[str]):
    """Inside the block, every LoRA layer applies adapter names[i] to batch row i ("__base__" = no adapter).

    This is what peft's `PeftModel.forward(adapter_names=...)` does (its mixed-adapter batch); here it wraps a call
    into the backbone alone, so the LM head runs only where it is needed. The hooks exist only inside the block,
    so generation and training pay nothing for them.
    """
    from peft.tuners.lora import LoraLayer

    def hook(module, args, kwargs):
        kwargs["adapter_names"] = names
        return args, kwargs

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True)
               for m in peft_model.modules() if isinstance(m, LoraLayer)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class SharedBase(ActorCritic):
    """One causal LM with LoRA adapters "policy", "value" (and "reward"), plus value and reward heads.

    peft_model: a PeftModel whose active adapter is "policy" and that also holds "value" (and "reward").
    Trainable: the policy and value LoRA weights and the value head; the base and the reward role are frozen.
    """

    def __init__(self, peft_model, value_head: nn.Linear, reward_head: nn.Linear | None = None,
                 temperature: float = 1.0, shared_critic: bool = False):
        super().__init__(temperature)
        self.shared_critic = shared_critic
        self.peft_model = peft_model
        self.value_head = value_head
        self.reward_head = reward_head
        self.config = peft_model.get_base_model().config
        self._active = peft_model.active_adapter
        self._set_trainable()
        self.value_head.requires_grad_(True)
        if self.reward_head is not None:
            self.reward_head.requires_grad_(False)
        self.eval()

    full = False

    def policy_generator(self):
        self._use(POLICY)
        return self.peft_model

    def peft_for(self, role: str):
        """The PeftModel that holds adapter `role` (for saving and loading it)."""
        return self.peft_model

    def causal_lms(self) -> list:
        return [self.peft_model.get_base_model()]

    def _lm_head(self, role: str) -> nn.Module:
        return self.peft_model.get_base_model().get_output_embeddings()

    def _use(self, role: str) -> None:
        """Make `role` the active adapter for plain (not mixed-batch) passes. peft's set_adapter also changes
        requires_grad (only the active adapter trains), so the trainable set is restored right after."""
        if self._active != role:
            self.peft_model.set_adapter(role)
            self._active = role
            self._set_trainable()

    def _set_trainable(self) -> None:
        for name, p in self.peft_model.named_parameters():
            p.requires_grad_(("lora_" in name) and (f".{POLICY}." in name or f".{VALUE}." in name))

    def _hidden_one(self, role, input_ids, attention_mask, position_ids):
        self._use(role)
        self._set_checkpoint_mode(torch.is_grad_enabled())
        try:
            return _backbone(self.peft_model.get_base_model())(
                input_ids=input_ids, attention_mask=attention_mask.long(), position_ids=position_ids,
                use_cache=False).last_hidden_state  # (B, T, H)
        finally:
            self._set_checkpoint_mode(False)

    def _hidden(self, roles, input_ids, attention_mask, position_ids):
        B = input_ids.shape[0]
        n = len(roles)
        names = [r for r in roles for _ in range(B)]  # (n*B,) one adapter per row
        with row_adapters(self.peft_model, names):
            out = _backbone(self.peft_model.get_base_model())(
                input_ids=input_ids.repeat(n, 1), attention_mask=attention_mask.long().repeat(n, 1),
                position_ids=position_ids.repeat(n, 1), use_cache=False,
            ).last_hidden_state  # (n*B, T, H)
        return list(out.split(B, dim=0))


class SeparateModels(ActorCritic):
    """Policy, reference, value and reward as separate models (the memory baseline; also `--full` training).

    policy_lm: a causal LM (a PeftModel with the "policy" adapter, or a plain model trained in full);
    ref_lm: a frozen causal LM; value_lm: a causal LM whose backbone feeds `value_head` (PeftModel with "value",
    or plain, trained in full); reward_lm + reward_head: frozen, or None.
    """

    def __init__(self, policy_lm, ref_lm, value_lm, value_head: nn.Linear, reward_lm=None,
                 reward_head: nn.Linear | None = None, temperature: float = 1.0, full: bool = False):
        super().__init__(temperature)
        self.full = full
        self.policy_lm, self.ref_lm, self.value_lm = policy_lm, ref_lm, value_lm
        self.reward_lm = reward_lm
        self.value_head, self.reward_head = value_head, reward_head
        self.config = _plain(policy_lm).config
        for role, lm in ((POLICY, policy_lm), (VALUE, value_lm)):
            for name, p in lm.named_parameters():
                p.requires_grad_(full or ("lora_" in name and f".{role}." in name))
        if full:  # the value model never uses its LM head
            _plain(value_lm).get_output_embeddings().requires_grad_(False)
        self.ref_lm.requires_grad_(False)
        if reward_lm is not None:
            reward_lm.requires_grad_(False)
            reward_head.requires_grad_(False)
        self.value_head.requires_grad_(True)
        self.eval()

    def policy_generator(self):
        return self.policy_lm

    def peft_for(self, role: str):
        return self.policy_lm if role == POLICY else self.value_lm

    def causal_lms(self) -> list:
        return [_plain(m) for m in (self.policy_lm, self.ref_lm, self.value_lm, self.reward_lm) if m is not None]

    def _lm_head(self, role: str) -> nn.Module:
        return _plain(self.policy_lm if role == POLICY else self.ref_lm).get_output_embeddings()

    def _hidden_one(self, role, input_ids, attention_mask, position_ids):
        return self._hidden([role], input_ids, attention_mask, position_ids)[0]

    def _hidden(self, roles, input_ids, attention_mask, position_ids):
        lms = {POLICY: self.policy_lm, NO_ADAPTER: self.ref_lm, VALUE: self.value_lm, REWARD: self.reward_lm}
        self._set_checkpoint_mode(torch.is_grad_enabled())
        try:
            return [_backbone(_plain(lms[r]))(input_ids=input_ids, attention_mask=attention_mask.long(),
                                              position_ids=position_ids, use_cache=False).last_hidden_state
                    for r in roles]
        finally:
            self._set_checkpoint_mode(False)


def _plain(lm):
    """The transformers model under a PeftModel (or the model itself)."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


# -------------------------------------------------------------------------------------------- building them


def reward_lora_parts(adapter_dir) -> tuple[dict, dict, dict]:
    """Split a saved SEQ_CLS PEFT adapter into (lora_config kwargs, LoRA tensors, head tensors).

    The reward stage saves `AutoModelForSequenceClassification` + LoRA with peft: adapter_model.safetensors holds
    `base_model.model.<backbone>....lora_A.weight` / `lora_B.weight` and the head as `base_model.model.score.weight`
    (modules_to_save). Backbone parameter names are the same in ...ForCausalLM and ...ForSequenceClassification
    (Llama, Qwen2: `model.`; GPT-2: `transformer.`), so the LoRA tensors load unchanged into a causal LM.
    """
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    head_names = ("score", "classifier")
    head, lora = {}, {}
    for key, t in tensors.items():
        parts = key.split(".")
        if "lora_A" in parts or "lora_B" in parts or "lora_embedding_A" in parts or "lora_embedding_B" in parts:
            lora[key] = t
        elif any(h in parts for h in head_names):
            head[parts[-1]] = t  # "weight" / "bias"
        else:
            lora[key] = t  # e.g. bias="all" adapters; set_peft_model_state_dict reports anything it can't place
    keys = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "bias", "fan_in_fan_out",
            "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "exclude_modules")
    lora_kwargs = {k: cfg[k] for k in keys if k in cfg and cfg[k] is not None}
    return lora_kwargs, lora, head


def add_lora_adapter(peft_model, name: str, lora_kwargs: dict, weights: dict | None = None) -> None:
    """Add a causal-LM LoRA adapter `name` to `peft_model`, optionally loading `weights` (peft's saved key format).

    Raises ValueError if a weight has no place in the model (a LoRA trained on another architecture)."""
    peft_model.add_adapter(name, _lora_from_kwargs(lora_kwargs))
    if weights:
        _load_into(peft_model, name, weights)


def build_shared(base_lm, policy_lora, reward: dict | None = None, temperature: float = 1.0,
                 shared_critic: bool = False, critic: bool = True) -> SharedBase:
    """The shared-base ActorCritic on `base_lm` (which it wraps in place).

    policy_lora: a peft LoraConfig for the policy adapter. reward: None, or {"lora_kwargs", "lora", "head"} from
    `reward_lora_parts` (then the value adapter and head start as copies of the reward's, as in InstructGPT;
    otherwise the value adapter is a fresh LoRA like the policy's and the value head starts at 0).
    shared_critic: no value adapter; the value head (starting at 0) reads the policy adapter's hidden states, so
    one pass trains both (about half the training compute; the value loss then also shapes the policy's LoRA).
    critic=False (grpo/rloo): no value model (as shared_critic, the zero head frozen): one pass per training step.
    """
    from peft import get_peft_model

    shared_critic = shared_critic or not critic  # no value adapter
    policy_lora = copy.deepcopy(policy_lora)
    policy_lora.task_type = "CAUSAL_LM"
    peft_model = get_peft_model(base_lm, policy_lora, adapter_name=POLICY)
    hidden_size = base_lm.get_input_embeddings().embedding_dim
    dtype = base_lm.get_input_embeddings().weight.dtype
    device = base_lm.get_input_embeddings().weight.device
    reward_head = None
    if reward is not None:
        add_lora_adapter(peft_model, REWARD, reward["lora_kwargs"], reward["lora"])
        reward_head = make_head(hidden_size, reward["head"]["weight"], reward["head"].get("bias"), dtype)
    if shared_critic:
        value_head = make_head(hidden_size)  # float32: trained, also on bf16 weights
    elif reward is not None:
        add_lora_adapter(peft_model, VALUE, reward["lora_kwargs"], reward["lora"])
        value_head = make_head(hidden_size, reward["head"]["weight"], reward["head"].get("bias"))  # float32
    else:
        value_kwargs = {k: getattr(policy_lora, k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules",
                                                              "bias")}
        add_lora_adapter(peft_model, VALUE, value_kwargs)
        value_head = make_head(hidden_size)  # float32: trained, also on bf16 weights
    model = SharedBase(peft_model, value_head, reward_head, temperature, shared_critic=shared_critic)
    if not critic:  # the zero head is never trained nor saved
        model.value_head.requires_grad_(False)
        model.has_critic = False
    return model.to(device)


def build_separate(base_lm, policy_lora, reward: dict | None = None, temperature: float = 1.0,
                   full: bool = False) -> SeparateModels:
    """The SeparateModels ActorCritic: four copies of `base_lm` (policy, reference, value, reward).

    full=True trains all policy and value weights (no policy/value LoRA; `policy_lora` is ignored).
    """
    from peft import get_peft_model

    hidden_size = base_lm.get_input_embeddings().embedding_dim
    dtype = base_lm.get_input_embeddings().weight.dtype
    ref_lm = copy.deepcopy(base_lm)
    value_base = copy.deepcopy(base_lm)
    reward_lm = reward_head = None
    if reward is not None:
        reward_lm = get_peft_model(copy.deepcopy(base_lm), _lora_from_kwargs(reward["lora_kwargs"]),
                                   adapter_name=REWARD)
        _load_into(reward_lm, REWARD, reward["lora"])
        reward_head = make_head(hidden_size, reward["head"]["weight"], reward["head"].get("bias"), dtype)
        value_head = make_head(hidden_size, reward["head"]["weight"], reward["head"].get("bias"))  # float32
    else:
        value_head = make_head(hidden_size)  # float32: trained, also on bf16 weights
    if full:
        policy_lm, value_lm = base_lm, value_base
        if reward is not None:  # start the value model from the reward model: merge its LoRA into the copy
            value_lm = get_peft_model(value_base, _lora_from_kwargs(reward["lora_kwargs"]), adapter_name=VALUE)
            _load_into(value_lm, VALUE, reward["lora"])
            value_lm = value_lm.merge_and_unload()
    else:
        policy_lora = copy.deepcopy(policy_lora)
        policy_lora.task_type = "CAUSAL_LM"
        policy_lm = get_peft_model(base_lm, policy_lora, adapter_name=POLICY)
        if reward is not None:
            value_lm = get_peft_model(value_base, _lora_from_kwargs(reward["lora_kwargs"]), adapter_name=VALUE)
            _load_into(value_lm, VALUE, reward["lora"])
        else:
            value_lm = get_peft_model(value_base, copy.deepcopy(policy_lora), adapter_name=VALUE)
    device = base_lm.get_input_embeddings().weight.device
    return SeparateModels(policy_lm, ref_lm, value_lm, value_head, reward_lm, reward_head, temperature,
                          full=full).to(device)


def _lora_from_kwargs(kwargs: dict):
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", **kwargs)


def _load_into(peft_model, name: str, weights: dict) -> None:
    """Load LoRA `weights` (peft's saved key format) into adapter `name`; ValueError for a weight with no place."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, weights, adapter_name=name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"{len(unexpected)} adapter weights do not fit the model, e.g. {unexpected[0]}")
