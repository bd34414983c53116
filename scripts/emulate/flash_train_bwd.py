# Emulates kiln_train_flash_bwd (kernels/cuda/attention_train.cu) lane by lane — the kernel's
# own index arithmetic over warp.py's ldmatrix / mma, warps run phase by phase between the
# kernel's barriers — and compares dq, dk, dv with an f64 reference. No GPU needed; it checks
# indexing and fragment use, not timing, races or the hardware. Keep it in step with the kernel.
#
#   python3 scripts/emulate/flash_train_bwd.py B,T,nh,kvh,hd ...   e.g. 1,70,2,1,32 1,100,7,1,128
import sys, os
import numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
FAILED = [False]
from warp import bf16, ldmatrix_x4, mma, pack, LANES, G, TQ, MI

KEYS, ROWS = 64, 32

def fb_abt(HD, smem, a_off, b_off):
    S = HD + 8; QN = ROWS // 8
    acc = [np.zeros((32, 4)) for _ in range(QN)]
    for kk in range(0, HD // 16, 2):
        a0 = ldmatrix_x4(smem, a_off + ((MI & 1) * 8 + (LANES & 7)) * S + kk * 16 + (MI >> 1) * 8)
        a1 = ldmatrix_x4(smem, a_off + ((MI & 1) * 8 + (LANES & 7)) * S + (kk + 1) * 16 + (MI >> 1) * 8)
        for j in range(QN):
            bb = ldmatrix_x4(smem, b_off + (j * 8 + (LANES & 7)) * S + (kk + (MI >> 1)) * 16 + (MI & 1) * 8)
            acc[j] = mma(acc[j], a0, bb[0], bb[1])
            acc[j] = mma(acc[j], a1, bb[2], bb[3])
    return acc

def fb_acc(HD, smem, acc, f, b_off):
    S = HD + 8
    for kk in range(ROWS // 16):
        for n in range(0, HD // 8, 2):
            bb = ldmatrix_x4(smem, b_off + (kk * 16 + (MI & 1) * 8 + (LANES & 7)) * S + n * 8 + (MI >> 1) * 8, True)
            acc[n] = mma(acc[n], f[kk], bb[0], bb[1])
            acc[n + 1] = mma(acc[n + 1], f[kk], bb[2], bb[3])

def block(HD, kt, bg, q, k, v, dout, lse, dd, dq, dk, dv, T, nh, kvh, scale_log2, scale):
    S = HD + 8; DS = KEYS + 8; NT = HD // 8; QN = ROWS // 8
    ks, vs = 0, KEYS * S
    qs = vs + KEYS * S; os_ = qs + ROWS * S; dss = os_ + ROWS * S
    smem = np.zeros(dss + ROWS * DS + 64, np.float32)
    b, g, rep = bg // kvh, bg % kvh, nh // kvh
    k0 = kt * KEYS
    kv_off = bg * T * HD
    for r in range(KEYS):
        if k0 + r < T:
            smem[ks + r*S: ks + r*S + HD] = k[kv_off + (k0+r)*HD: kv_off + (k0+r)*HD + HD]
            smem[vs + r*S: vs + r*S + HD] = v[kv_off + (k0+r)*HD: kv_off + (k0+r)*HD + HD]
    dk_acc = [[np.zeros((32, 4)) for _ in range(NT)] for w in range(4)]
    dv_acc = [[np.zeros((32, 4)) for _ in range(NT)] for w in range(4)]
    for r in range(rep):
        row0 = (b * nh + g * rep + r) * T
        q0 = (k0 // ROWS) * ROWS
        while q0 < T:
            smem[qs: dss] = 0
            for rr in range(ROWS):
                if q0 + rr < T:
                    smem[qs + rr*S: qs + rr*S + HD] = q[(row0+q0+rr)*HD: (row0+q0+rr)*HD + HD]
                    smem[os_ + rr*S: os_ + rr*S + HD] = dout[(row0+q0+rr)*HD: (row0+q0+rr)*HD + HD]
            lse_s = np.array([lse[row0 + q0 + i] if q0 + i < T else 0.0 for i in range(ROWS)], np.float32)
            dd_s = np.array([dd[row0 + q0 + i] if q0 + i < T else 0.0 for i in range(ROWS)], np.float32)
            for warp in range(4):
                kw = warp * 16
                key_lo = k0 + kw + G; key_hi = key_lo + 8
                if k0 + kw < T and q0 + ROWS - 1 >= k0 + kw:
                    st = fb_abt(HD, smem, ks + kw * S, qs)
                    pa = [[None]*4 for _ in range(QN // 2)]
                    for j in range(QN):
                        for e in range(2):
                            qc = j * 8 + TQ * 2 + e; t = q0 + qc
                            l2 = lse_s[qc]
                            st[j][:, e] = np.where((key_lo <= t) & (t < T), np.exp2(st[j][:, e] * scale_log2 - l2), 0.0)
                            st[j][:, 2+e] = np.where((key_hi <= t) & (t < T), np.exp2(st[j][:, 2+e] * scale_log2 - l2), 0.0)
                        pa[j >> 1][(j & 1) * 2] = pack(st[j][:, 0], st[j][:, 1])
                        pa[j >> 1][(j & 1) * 2 + 1] = pack(st[j][:, 2], st[j][:, 3])
                    fb_acc(HD, smem, dv_acc[warp], pa, os_)
                    dpt = fb_abt(HD, smem, vs + kw * S, os_)
                    da = [[None]*4 for _ in range(QN // 2)]
                    kl = kw + G
                    for j in range(QN):
                        for e in range(2):
                            qc = j * 8 + TQ * 2 + e
                            d = dd_s[qc]
                            dpt[j][:, e] = scale * st[j][:, e] * (dpt[j][:, e] - d)
                            dpt[j][:, 2+e] = scale * st[j][:, 2+e] * (dpt[j][:, 2+e] - d)
                            smem[dss + qc * DS + kl] = bf16(dpt[j][:, e])
                            smem[dss + qc * DS + kl + 8] = bf16(dpt[j][:, 2+e])
                        da[j >> 1][(j & 1) * 2] = pack(dpt[j][:, 0], dpt[j][:, 1])
                        da[j >> 1][(j & 1) * 2 + 1] = pack(dpt[j][:, 2], dpt[j][:, 3])
                    fb_acc(HD, smem, dk_acc[warp], da, qs)
                else:
                    for i in range(ROWS * 16):
                        smem[dss + (i >> 4) * DS + kw + (i & 15)] = 0
            for warp in range(4):
                qr, c0 = (warp & 1) * 16, (warp >> 1) * (HD // 2)
                dqa = [np.zeros((32, 4)) for _ in range(NT // 2)]
                for kk in range(KEYS // 16):
                    a = ldmatrix_x4(smem, dss + (qr + (MI & 1) * 8 + (LANES & 7)) * DS + kk * 16 + (MI >> 1) * 8)
                    for n in range(0, NT // 2, 2):
                        bb = ldmatrix_x4(smem, ks + (kk * 16 + (MI & 1) * 8 + (LANES & 7)) * S + c0 + n * 8 + (MI >> 1) * 8, True)
                        dqa[n] = mma(dqa[n], a, bb[0], bb[1])
                        dqa[n + 1] = mma(dqa[n + 1], a, bb[2], bb[3])
                t_lo = q0 + qr + G; t_hi = t_lo + 8
                for n in range(NT // 2):
                    c = c0 + n * 8 + TQ * 2
                    for l in range(32):
                        if t_lo[l] < T:
                            dq[(row0 + t_lo[l]) * HD + c[l]] += dqa[n][l, 0]
                            dq[(row0 + t_lo[l]) * HD + c[l] + 1] += dqa[n][l, 1]
                        if t_hi[l] < T:
                            dq[(row0 + t_hi[l]) * HD + c[l]] += dqa[n][l, 2]
                            dq[(row0 + t_hi[l]) * HD + c[l] + 1] += dqa[n][l, 3]
            q0 += ROWS
    for warp in range(4):
        kw = warp * 16
        key_lo = k0 + kw + G; key_hi = key_lo + 8
        for n in range(NT):
            c = n * 8 + TQ * 2
            for l in range(32):
                if key_lo[l] < T:
                    dk[kv_off + key_lo[l]*HD + c[l]: kv_off + key_lo[l]*HD + c[l] + 2] = dk_acc[warp][n][l, 0:2]
                    dv[kv_off + key_lo[l]*HD + c[l]: kv_off + key_lo[l]*HD + c[l] + 2] = dv_acc[warp][n][l, 0:2]
                if key_hi[l] < T:
                    dk[kv_off + key_hi[l]*HD + c[l]: kv_off + key_hi[l]*HD + c[l] + 2] = dk_acc[warp][n][l, 2:4]
                    dv[kv_off + key_hi[l]*HD + c[l]: kv_off + key_hi[l]*HD + c[l] + 2] = dv_acc[warp][n][l, 2:4]

def run(B, T, nh, kvh, HD, seed):
    rng = np.random.default_rng(seed)
    rep = nh // kvh
    q = bf16(rng.uniform(-2, 2, B*nh*T*HD)).astype(np.float64)
    k = bf16(rng.uniform(-2, 2, B*kvh*T*HD)).astype(np.float64)
    v = bf16(rng.uniform(-1, 1, B*kvh*T*HD)).astype(np.float64)
    dO = rng.uniform(-1, 1, (B, nh, T, HD))  # group layout values
    scale = 1 / np.sqrt(HD); scale_log2 = np.log2(np.e) * scale
    Q = q.reshape(B, nh, T, HD); K = k.reshape(B, kvh, T, HD); V = v.reshape(B, kvh, T, HD)
    lse = np.zeros((B, nh, T)); dd = np.zeros((B, nh, T))
    dq_ref = np.zeros_like(Q); dk_ref = np.zeros_like(K); dv_ref = np.zeros_like(V)
    mask = np.tril(np.ones((T, T), bool))
    for b in range(B):
        for h in range(nh):
            g = h // rep
            s = scale * Q[b, h] @ K[b, g].T
            s = np.where(mask, s, -np.inf)
            m = s.max(1, keepdims=True)
            e = np.exp(s - m); l = e.sum(1, keepdims=True)
            p = e / l
            lse[b, h] = (m[:, 0] + np.log(l[:, 0])) / np.log(2)
            o = p @ V[b, g]
            dd[b, h] = (dO[b, h] * o).sum(1)
            dp = dO[b, h] @ V[b, g].T
            ds = p * (dp - dd[b, h][:, None]) * scale
            dv_ref[b, g] += p.T @ dO[b, h]
            dq_ref[b, h] = ds @ K[b, g]
            dk_ref[b, g] += ds.T @ Q[b, h]
    dout = bf16(dO.reshape(-1)).astype(np.float64)
    # D as kiln_train_attn_dot makes it: from the bf16 dO (the reference keeps the f32 one)
    lse_f = lse.reshape(-1).astype(np.float32)
    dd_f = np.zeros(B * nh * T, np.float32)
    for b in range(B):
        for h in range(nh):
            o = (np.exp(np.where(mask, scale * Q[b, h] @ K[b, h // rep].T, -np.inf) - lse[b, h][:, None] * np.log(2))) @ V[b, h // rep]
            dd_f[(b * nh + h) * T:(b * nh + h + 1) * T] = (dout.reshape(B, nh, T, HD)[b, h] * bf16(o)).sum(1)
    dq = np.zeros(B*nh*T*HD); dk = np.zeros(B*kvh*T*HD); dv = np.zeros(B*kvh*T*HD)
    for bg in range(B * kvh):
        for kt in range((T + 63) // 64):
            block(HD, kt, bg, q, k, v, dout, lse_f, dd_f, dq, dk, dv, T, nh, kvh, scale_log2, scale)
    for name, got, want in [("dq", dq, dq_ref), ("dk", dk, dk_ref), ("dv", dv, dv_ref)]:
        want = want.reshape(-1)
        sc = max(1.0, np.abs(want).max())
        err = np.abs(got - want).max()
        ok = err <= 2e-2 * sc
        print(f"B{B} T{T} nh{nh} kvh{kvh} hd{HD} {name}: max|Δ| {err:.3e} scale {sc:.3f} rel {err/sc:.2e}", "OK" if ok else "FAIL")
        FAILED[0] |= not ok

if __name__ == "__main__":
    for a in sys.argv[1:]:
        run(*map(int, a.split(",")), seed=1)
    sys.exit(1 if FAILED[0] else 0)
