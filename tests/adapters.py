"""Build a small, non-trivial LoRA adapter folder (as finetune.py writes it) for tests of
generate/export that should not depend on a training run."""

from __future__ import annotations

from pathlib import Path

import torch


def make_adapter(
    base_dir: Path,
    out_dir: Path,
    template_name: str = "alpaca",
    r: int = 4,
    target_modules=("q_proj", "v_proj"),
    seed: int = 0,
    scale: float = 0.5,
) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_alpaca.models import BaseModelRef, config_fingerprint, load_tokenizer
    from lora_alpaca.prompts import load_template
    from lora_alpaca.runfolder import build_manifest, write_manifest

    ref = BaseModelRef(str(base_dir), str(base_dir))
    tok = load_tokenizer(ref)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = dict(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(target_modules))
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # lora_B starts at zero; give it values so the adapter matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    template = load_template(template_name)
    write_manifest(
        out_dir,
        build_manifest(
            base_model_name=str(base_dir),
            base_model_path=str(Path(base_dir).resolve()),
            base_config_fingerprint=config_fingerprint(base.config),
            model_type=base.config.model_type,
            template=template,
            tokenizer=tok,
            train_on_inputs=False,
            add_eos_token=True,
            cutoff_len=256,
            quantization="none",
            dtype="fp32",
            lora={**lora, "use_rslora": False, "use_dora": False},
        ),
    )
    return out_dir
