"""Can XLM-R train padding-free (several rows packed into one sequence, `DataCollatorWithFlattening`
style) with the installed transformers on this machine? Checked, not assumed:

1. packed rows with restarting `position_ids` and no attention mask, as the flattening collator
   feeds them: does each row's output equal its output alone? (flash-attention-2 derives the
   row boundaries from the position ids; SDPA must be told by a mask);
2. packed rows with an explicit block-diagonal 4-D mask, which SDPA does honour: same question,
   and what one training step costs against the length-grouped, dynamically padded batch that
   xstilts trains on.

    python benchmarks/packing_check.py [--rows 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import ARCHITECTURES, build_encoder, pair_lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import torch
    import transformers
    from transformers import AutoModel

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        encoder = AutoModel.from_pretrained(build_encoder(Path(tmp) / "m", ARCHITECTURES["tiny"]),
                                            add_pooling_layer=False, attn_implementation="sdpa").eval()
    pad, first_position = encoder.config.pad_token_id, encoder.config.pad_token_id + 1
    # a length-grouped batch as xstilts's sampler makes them: a megabatch of 50 batches sorted by
    # length and cut into batches; the one in the middle
    megabatch = sorted(p + h + 4 for p, h in pair_lengths(50 * args.rows, seed=3))
    middle = 25 * args.rows
    lengths = megabatch[middle: middle + args.rows]
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(5, 1000, (n,), generator=g) for n in lengths]

    # padded batch, as the xstilts collator builds it
    width = max(lengths)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    # packed: one sequence, positions restarting per row (XLM-R counts from padding_idx + 1)
    packed = torch.cat(rows)[None]
    positions = torch.cat([torch.arange(first_position, first_position + len(r)) for r in rows])[None]
    segment = torch.cat([torch.full((len(r),), i) for i, r in enumerate(rows)])
    block = (segment[:, None] == segment[None, :])[None, None]  # (1, 1, T, T) bool: attend within a row

    with torch.no_grad():
        alone = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        reference = torch.cat([alone[i, : len(r)] for i, r in enumerate(rows)])
        unmasked = encoder(input_ids=packed, position_ids=positions).last_hidden_state[0]
        blocked = encoder(input_ids=packed, position_ids=positions, attention_mask=block).last_hidden_state[0]

    def step(**inputs: torch.Tensor) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            started = time.perf_counter()
            encoder(**inputs).last_hidden_state.sum().backward()
            best = min(best, time.perf_counter() - started)
        return best

    encoder.train()
    t_padded = step(input_ids=ids, attention_mask=mask)
    t_packed = step(input_ids=packed, position_ids=positions, attention_mask=block)
    real = sum(lengths)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}; flash_attn installed:"
          f" {importlib.util.find_spec('flash_attn') is not None}; CUDA: {torch.cuda.is_available()}")
    print(f"{len(rows)} rows of {min(lengths)}-{max(lengths)} tokens ({real} real tokens)")
    print(f"1. packed, position ids only (SDPA):  max |difference| from the rows alone ="
          f" {(unmasked - reference).abs().max():.3g}  -> rows attend to each other: wrong")
    print(f"2. packed, block-diagonal 4-D mask:   max |difference| = {(blocked - reference).abs().max():.3g}")
    print(f"   train step (forward + backward), best of {args.repeats}:")
    print(f"     length-grouped, padded to {width}: {t_padded * 1000:7.1f} ms"
          f"  ({1 - real / (width * len(rows)):.1%} padding)")
    print(f"     packed into one sequence of {real}: {t_packed * 1000:7.1f} ms"
          f"  (attention over {real}^2 positions, {len(rows)}x the block's own)")
    print(f"   packed / padded time: {t_packed / t_padded:.2f}x")


if __name__ == "__main__":
    main()
