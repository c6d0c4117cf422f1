"""fusedattn quickstart: causal grouped-query self-attention with the log-sum-exp, checked against the reference."""
import numpy as np

import fusedattn

rng = np.random.default_rng(0)
batch, q_heads, kv_heads, seq, dim = 2, 8, 2, 256, 64  # GQA: 4 query heads share each kv head
q = rng.standard_normal((batch, q_heads, seq, dim), dtype=np.float32)
k = rng.standard_normal((batch, kv_heads, seq, dim), dtype=np.float32)
v = rng.standard_normal((batch, kv_heads, seq, dim), dtype=np.float32)

out, lse = fusedattn.attention(q, k, v, causal=True, return_lse=True)
ref_out, ref_lse = fusedattn.reference.attention(q, k, v, causal=True, return_lse=True)

print("backend:", fusedattn.backend_info()["isa"])
print("out:", out.shape, out.dtype, " lse:", lse.shape)  # (2, 8, 256, 64) and (2, 8, 256)
print("max |out - reference|:", float(np.abs(out - ref_out).max()))
print("max |lse - reference|:", float(np.abs(lse - ref_lse).max()))
