"""Run a trained KJV classifier directory through the inference engine and the trainer's NumPy
forward pass on the test split: accuracy of each, agreement, largest logit difference, engine
tokens/s. Usage: python scripts/kjv_engine_check.py MODEL_DIR [MAX_LEN]"""
import sys, time, numpy as np, attncore
from attncore.data import get_task
from attncore.train.export import load_model
from attncore.train import autograd as ag
model_dir, max_len = sys.argv[1], (int(sys.argv[2]) if len(sys.argv) > 2 else None)
opts = dict(label="genre", level="bpe", vocab_size=4000)
if max_len: opts["max_len"] = max_len
task = get_task("kjv", seed=0, **opts)
engine = attncore.load(model_dir)
ref = load_model(model_dir)
docs = [np.asarray(task.encode(t), dtype=np.int64) for t, _ in task.examples("test")]
t = time.perf_counter()
logits = engine.classify(docs)
logits = logits[0] if isinstance(logits, tuple) else logits
sec = time.perf_counter() - t
pred_engine = np.asarray(logits).argmax(-1)
with ag.no_grad():
    pred_ref = np.concatenate([ref.eval()(ids, lengths).data.argmax(-1) for ids, lengths, _ in task.batches("test", 16)])
truth = np.concatenate([y for _, _, y in task.batches("test", 16)])
print(f"{model_dir}: engine accuracy {np.mean(pred_engine == truth):.4f}, trainer {np.mean(pred_ref == truth):.4f}, "
      f"agree {np.mean(pred_engine == pred_ref):.4f}, max |logit diff| "
      f"{np.abs(np.asarray(logits) - np.concatenate([ref(ids, lengths).data for ids, lengths, _ in task.batches('test', 16)])).max():.2e}, "
      f"engine {sum(map(len, docs)) / sec:.0f} tok/s over {len(docs)} documents ({sum(map(len, docs))} tokens)")
