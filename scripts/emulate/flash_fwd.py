# Emulates kiln_flash_fwd<HD, u16> (kernels/cuda/flash_attention.cuh) with the train step's
# layout (attention_train.cu's forward entry) lane by lane over warp.py's ldmatrix / mma, and
# compares the output (bf16 tokens) and each row's log-sum-exp with an f64 reference. No GPU
# needed; it checks indexing and fragment use, not timing or the hardware. Keep it in step.
#
#   python3 scripts/emulate/flash_fwd.py B,T,nh,kvh,hd ...   e.g. 2,70,4,2,32 1,200,7,1,128
import sys, os
import numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
FAILED = [False]
from warp import bf16, ldmatrix_x4, mma, pack, LANES, G, TQ, MI

ROWS = KEYS = 64
NEG = -np.inf

def fwd_block(HD, h, by, gridy, q, k, v, out, lse, T, nh, kvh, pos, scale_log2, lay):
    q_row, q_head, kv_head, out_row, out_head = lay
    S = HD + 8; KS = HD // 16; NT = HD // 8
    g = h // (nh // kvh)
    t0 = (gridy - 1 - by) * ROWS
    smem = np.zeros(2 * 2 * KEYS * S, np.float32)
    nkeys = pos + min(T, t0 + ROWS)
    kb, vb = g * kv_head, g * kv_head
    warps = []
    for warp in range(4):
        wr = t0 + warp * 16
        r_lo = wr + G; r_hi = r_lo + 8
        qa = []
        for kk in range(KS):
            c = kk * 16 + TQ * 2
            def ld(r, cc):
                vals = np.zeros((32, 2))
                for l in range(32):
                    if r[l] < T:
                        base = r[l] * q_row + h * q_head + cc[l]
                        vals[l] = q[base: base + 2]
                return vals
            qa.append([ld(r_lo, c), ld(r_hi, c), ld(r_lo, c + 8), ld(r_hi, c + 8)])
        warps.append(dict(wr=wr, r_lo=r_lo, r_hi=r_hi, qa=qa, o=[np.zeros((32, 4)) for _ in range(NT)],
                          m_lo=np.full(32, NEG), m_hi=np.full(32, NEG), l_lo=np.zeros(32), l_hi=np.zeros(32),
                          warp_last=min(T - 1, wr + 15)))
    def load(k0, st):
        ks = st * 2 * KEYS * S; vs = ks + KEYS * S
        for r in range(KEYS):
            if k0 + r < nkeys:
                smem[ks + r*S: ks + r*S + HD] = k[kb + (k0+r)*HD: kb + (k0+r)*HD + HD]
                smem[vs + r*S: vs + r*S + HD] = v[vb + (k0+r)*HD: vb + (k0+r)*HD + HD]
            else:
                smem[ks + r*S: ks + r*S + HD] = 0; smem[vs + r*S: vs + r*S + HD] = 0
    load(0, 0)
    k0, st = 0, 0
    while k0 < nkeys:
        if k0 + KEYS < nkeys:
            load(k0 + KEYS, st ^ 1)
        ks = st * 2 * KEYS * S; vs = ks + KEYS * S
        for w in warps:
            if not (w['wr'] < T and k0 <= pos + w['warp_last']):
                continue
            s = []
            for j in range(KEYS // 8):
                acc = np.zeros((32, 4))
                for kk in range(0, KS, 2):
                    b = ldmatrix_x4(smem, ks + (j * 8 + (LANES & 7)) * S + (kk + (MI >> 1)) * 16 + (MI & 1) * 8)
                    acc = mma(acc, w['qa'][kk], b[0], b[1]); acc = mma(acc, w['qa'][kk + 1], b[2], b[3])
                s.append(acc)
            mx_lo, mx_hi = w['m_lo'].copy(), w['m_hi'].copy()
            for j in range(KEYS // 8):
                for e in range(2):
                    key = k0 + j * 8 + TQ * 2 + e
                    a = np.where(key <= pos + w['r_lo'], s[j][:, e] * scale_log2, NEG)
                    bq = np.where(key <= pos + w['r_hi'], s[j][:, 2 + e] * scale_log2, NEG)
                    s[j][:, e] = a; s[j][:, 2 + e] = bq
                    mx_lo = np.maximum(mx_lo, a); mx_hi = np.maximum(mx_hi, bq)
            # reduce over the 4 lanes of a row
            mx_lo = np.repeat(mx_lo.reshape(8, 4).max(1), 4); mx_hi = np.repeat(mx_hi.reshape(8, 4).max(1), 4)
            base_lo = np.where(mx_lo == NEG, 0, mx_lo); base_hi = np.where(mx_hi == NEG, 0, mx_hi)
            with np.errstate(invalid='ignore'):
                al_lo = np.exp2(w['m_lo'] - base_lo); al_hi = np.exp2(w['m_hi'] - base_hi)
            w['m_lo'], w['m_hi'] = mx_lo, mx_hi
            pa = [[None] * 4 for _ in range(KEYS // 16)]
            sum_lo = np.zeros(32); sum_hi = np.zeros(32)
            for j in range(KEYS // 8):
                p0 = np.exp2(s[j][:, 0] - base_lo); p1 = np.exp2(s[j][:, 1] - base_lo)
                p2 = np.exp2(s[j][:, 2] - base_hi); p3 = np.exp2(s[j][:, 3] - base_hi)
                sum_lo += p0 + p1; sum_hi += p2 + p3
                pa[j >> 1][(j & 1) * 2] = pack(p0, p1); pa[j >> 1][(j & 1) * 2 + 1] = pack(p2, p3)
            w['l_lo'] = w['l_lo'] * al_lo + sum_lo; w['l_hi'] = w['l_hi'] * al_hi + sum_hi
            for n in range(NT):
                w['o'][n][:, 0:2] *= al_lo[:, None]; w['o'][n][:, 2:4] *= al_hi[:, None]
            for kk in range(KEYS // 16):
                for n in range(0, NT, 2):
                    b = ldmatrix_x4(smem, vs + (kk * 16 + (MI & 1) * 8 + (LANES & 7)) * S + n * 8 + (MI >> 1) * 8, True)
                    w['o'][n] = mma(w['o'][n], pa[kk], b[0], b[1]); w['o'][n + 1] = mma(w['o'][n + 1], pa[kk], b[2], b[3])
        k0 += KEYS; st ^= 1
    for w in warps:
        l_lo = np.repeat(w['l_lo'].reshape(8, 4).sum(1), 4); l_hi = np.repeat(w['l_hi'].reshape(8, 4).sum(1), 4)
        with np.errstate(divide='ignore', invalid='ignore'):
            inv_lo = 1 / l_lo; inv_hi = 1 / l_hi
        for n in range(NT):
            c = n * 8 + TQ * 2
            for l in range(32):
                if w['r_lo'][l] < T:
                    o0 = w['r_lo'][l] * out_row + h * out_head + c[l]
                    out[o0: o0 + 2] = bf16(w['o'][n][l, 0:2] * inv_lo[l])
                if w['r_hi'][l] < T:
                    o0 = w['r_hi'][l] * out_row + h * out_head + c[l]
                    out[o0: o0 + 2] = bf16(w['o'][n][l, 2:4] * inv_hi[l])
        for l in range(32):
            if l & 3 == 0:
                if w['r_lo'][l] < T: lse[h * T + w['r_lo'][l]] = w['m_lo'][l] + np.log2(l_lo[l])
                if w['r_hi'][l] < T: lse[h * T + w['r_hi'][l]] = w['m_hi'][l] + np.log2(l_hi[l])

def run(B, T, nh, kvh, HD, seed=3):
    rng = np.random.default_rng(seed)
    rep = nh // kvh
    q = bf16(rng.uniform(-2, 2, B*nh*T*HD)).astype(np.float64)
    k = bf16(rng.uniform(-2, 2, B*kvh*T*HD)).astype(np.float64)
    v = bf16(rng.uniform(-1, 1, B*kvh*T*HD)).astype(np.float64)
    scale = 1 / np.sqrt(HD); sl2 = np.log2(np.e) * scale
    out = np.zeros(B*T*nh*HD); lse = np.zeros(B*nh*T)
    lay = (HD, T*HD, T*HD, nh*HD, HD)
    gy = (T + 63) // 64
    for b in range(B):
        qb = q[b*nh*T*HD:(b+1)*nh*T*HD]; kb = k[b*kvh*T*HD:(b+1)*kvh*T*HD]; vb = v[b*kvh*T*HD:(b+1)*kvh*T*HD]
        ob = out[b*T*nh*HD:(b+1)*T*nh*HD]; lb = lse[b*nh*T:(b+1)*nh*T]
        for h in range(nh):
            for by in range(gy):
                fwd_block(HD, h, by, gy, qb, kb, vb, ob, lb, T, nh, kvh, 0, sl2, lay)
    Q = q.reshape(B, nh, T, HD); K = k.reshape(B, kvh, T, HD); V = v.reshape(B, kvh, T, HD)
    mask = np.tril(np.ones((T, T), bool))
    ow = np.zeros((B, T, nh, HD)); lw = np.zeros((B, nh, T))
    for b in range(B):
        for h in range(nh):
            s = np.where(mask, scale * Q[b, h] @ K[b, h // rep].T, -np.inf)
            m = s.max(1, keepdims=True); e = np.exp(s - m); l = e.sum(1, keepdims=True)
            ow[b, :, h] = (e / l) @ V[b, h // rep]
            lw[b, h] = (m[:, 0] + np.log(l[:, 0])) / np.log(2)
    eo = np.abs(out - ow.reshape(-1)).max(); el = np.abs(lse - lw.reshape(-1)).max()
    ok = eo < 1e-2 and el < 1e-4
    print(f"B{B} T{T} nh{nh} kvh{kvh} hd{HD}: out max|Δ| {eo:.2e}, lse max|Δ| {el:.2e}", "OK" if ok else "FAIL")
    FAILED[0] |= not ok

if __name__ == "__main__":
    for a in sys.argv[1:]:
        run(*map(int, a.split(",")))
    sys.exit(1 if FAILED[0] else 0)
