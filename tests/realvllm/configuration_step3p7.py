"""Config classes of the tests' tiny Step-3.7 model, loaded as remote code (`auto_map`).

make_models.py copies this file into the model folder; vLLM loads it with --trust-remote-code,
as it loads the hub checkpoint's own configuration file. Written for the tests, in the hub
checkpoint's (legacy) field names, because vLLM 0.32's Step-3.7 code reads those names:
vllm/model_executor/models/step_vl.py (PerceptionEncoder: width, layers, heads, use_rope2d, ...)
and step3p5.py (moe_layers_enum, att_impl_type, rope_theta, ...). transformers' own Step3p7Config
renames them (width -> hidden_size, ...), so the remote class must win, as it does for the real
checkpoint.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class Step3p7VisionConfig(PretrainedConfig):
    model_type = "step3p7_vision"

    def __init__(
        self,
        width: int = 64,
        layers: int = 1,
        heads: int = 2,
        image_size: int = 728,
        patch_size: int = 14,
        mlp_ratio: float = 4.0,
        ls_init_value: float | None = 0.1,
        output_dim: int | None = None,
        hidden_act: str = "gelu",
        use_abs_posemb: bool = True,
        use_cls_token: bool = False,
        use_rope2d: bool = True,
        use_ln_pre: bool = True,
        use_ln_post: bool = False,
        enable_patch: bool = True,
        **kwargs: Any,
    ) -> None:
        self.width = width
        self.layers = layers
        self.heads = heads
        self.image_size = image_size
        self.patch_size = patch_size
        self.mlp_ratio = mlp_ratio
        self.ls_init_value = ls_init_value
        self.output_dim = output_dim
        self.hidden_act = hidden_act
        self.use_abs_posemb = use_abs_posemb
        self.use_cls_token = use_cls_token
        self.use_rope2d = use_rope2d
        self.use_ln_pre = use_ln_pre
        self.use_ln_post = use_ln_post
        self.enable_patch = enable_patch
        super().__init__(**kwargs)


class Step3p7TextConfig(PretrainedConfig):
    """The `step3p5` text model; every field is kept as given (vLLM reads them by name)."""

    model_type = "step3p5"

    def __init__(self, **kwargs: Any) -> None:
        fields = {
            "architectures": ["Step3p5ForCausalLM"],
            "att_impl_type": "GQA",
            "moe_router_activation": "softmax",
            "use_moe_router_bias": True,
            "need_fp32_gate": True,
            "norm_expert_weight": True,
            "moe_router_scaling_factor": 1.0,
            "tie_word_embeddings": False,
            # Read as attributes (not getattr with a default) by vLLM's step3p5.py.
            "swiglu_limits": None,
            "swiglu_limits_shared": None,
            "rope_scaling": None,
            "attention_other_setting": None,
            "layer_types": None,
            "max_position_embeddings": None,
            "num_nextn_predict_layers": 0,
        }
        fields.update(kwargs)
        passthrough = {
            k: fields.pop(k)
            for k in ("architectures", "tie_word_embeddings", "bos_token_id", "eos_token_id")
            if k in fields
        }
        for key, value in fields.items():
            setattr(self, key, value)
        super().__init__(**passthrough)
        # vLLM's Step3p5 decoder reads these names (num_experts_per_tok for the MoE runner).
        self.num_experts_per_tok = getattr(self, "moe_top_k", None)


class Step3p7Config(PretrainedConfig):
    model_type = "step3p7"
    sub_configs = {"vision_config": Step3p7VisionConfig, "text_config": Step3p7TextConfig}

    def __init__(
        self,
        vision_config: dict[str, Any] | Step3p7VisionConfig | None = None,
        text_config: dict[str, Any] | Step3p7TextConfig | None = None,
        projector_bias: bool = False,
        image_token_id: int = 0,
        **kwargs: Any,
    ) -> None:
        if not isinstance(vision_config, PretrainedConfig):
            vision_config = Step3p7VisionConfig(**(vision_config or {}))
        if not isinstance(text_config, PretrainedConfig):
            text_config = Step3p7TextConfig(**(text_config or {}))
        self.vision_config = vision_config
        self.text_config = text_config
        self.projector_bias = projector_bias
        self.image_token_id = image_token_id
        self.hidden_size = getattr(text_config, "hidden_size", None)
        super().__init__(**kwargs)
