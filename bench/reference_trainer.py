"""The baseline: transformers.Trainer + PEFT, set up the way the seed articles do.

    python bench/reference_trainer.py --model builtin:tiny --train data/train.jsonl \
        --val data/val.jsonl --micro-batch 1 --batch 16 --steps 16 --out ref.json

TrainingArguments with per_device_train_batch_size and gradient_accumulation_steps, a
padding collator (DataCollatorForSeq2Seq, labels padded with -100), AdamW (adamw_torch),
a cosine schedule with warmup, gradient clipping at 1.0, LoRA through PEFT's get_peft_model
(q_proj/v_proj, r 8, alpha 16, dropout 0.05), the base in the given dtype or nf4 through
bitsandbytes. The examples are tokenized with loralab's own template and tokenizer call, so
both sides train on the same tokens, and the final loss is scored with loralab's
evaluate_loss on the same validation examples: only the training machinery differs.

For nf4 the seeds call prepare_model_for_kbit_training, which also turns on gradient
checkpointing; it is called here with use_gradient_checkpointing=False, so the baseline does
not pay for recomputation that loralab does not do.

Writes one JSON object: useful tokens (non-padding tokens fed to the model), train wall and
CPU time, tokens per wall second and per CPU second, peak RSS, final eval loss.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--val", required=True)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--quant", choices=["none", "nf4"], default="none")
    ap.add_argument("--micro-batch", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: bench/gpu_check.py")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from loralab.config import DataConfig
    from loralab.data.dataset import load_splits
    from loralab.models import load_tokenizer, resolve_model_path
    from loralab.train.loop import evaluate_loss

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    tok = load_tokenizer(args.model)
    splits = load_splits(DataConfig(path=args.train, val_path=args.val, max_seq_length=args.max_len,
                                    val_max_examples=10_000), tok, seed=args.seed)
    train_rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in splits.train]

    kwargs = {"dtype": dtype}
    if args.quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    if args.quant == "nf4" or args.device == "cuda":
        kwargs["device_map"] = {"": 0 if args.device == "cuda" else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model), **kwargs)
    model.config.use_cache = False
    if args.quant == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(args.seed)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))

    pad = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100, return_tensors="pt")
    counted = {"tokens": 0, "padded": 0}

    def collate(rows):
        batch = pad(rows)
        counted["tokens"] += int(batch["attention_mask"].sum())
        counted["padded"] += batch["input_ids"].numel()
        return batch

    clock = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.synchronize()
            clock["t0"], clock["c0"] = time.perf_counter(), time.process_time()

        def on_train_end(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.synchronize()
            clock["t1"], clock["c1"] = time.perf_counter(), time.process_time()

    targs = TrainingArguments(
        output_dir=args.out + ".trainer", per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.batch // args.micro_batch, max_steps=args.steps,
        learning_rate=args.lr, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999,
        lr_scheduler_type="cosine", warmup_steps=args.warmup, max_grad_norm=1.0, optim="adamw_torch",
        logging_steps=10_000, save_strategy="no", report_to=[], seed=args.seed, use_cpu=args.device == "cpu",
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train_rows, data_collator=collate,
                      callbacks=[Clock()])
    trainer.train()
    train_time, train_cpu = clock["t1"] - clock["t0"], clock["c1"] - clock["c0"]
    eval_loss = evaluate_loss(model, splits.val, batch_size=8, pad_id=tok.pad_token_id,
                              device=torch.device(args.device), autocast="none")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"side": "reference", "useful_tokens": counted["tokens"], "padded_tokens": counted["padded"],
           "train_time_s": train_time, "tokens_per_s": counted["tokens"] / train_time,
           "train_cpu_time_s": train_cpu, "tokens_per_cpu_s": counted["tokens"] / train_cpu,
           "peak_rss_bytes": rss, "final_eval_loss": eval_loss, "steps": args.steps,
           "peak_cuda_reserved_bytes": torch.cuda.max_memory_reserved() if args.device == "cuda" else None,
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
