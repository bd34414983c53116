# Lane-level emulation of the warp instructions Kiln's flash-attention kernels use, for checking
# a kernel's index arithmetic on a machine without a GPU: ldmatrix.x4 (plain and .trans) and
# mma.sync.m16n8k16 bf16 -> f32 with the fragment layouts of the PTX ISA, bf16 rounding (round
# to nearest even), and bf16x2 packing. Registers are numpy arrays over the 32 lanes; shared
# memory is a flat array of bf16 values indexed in elements, as the kernels index it.
# Used by flash_fwd.py and flash_train_bwd.py (numpy needed: pip install numpy).
import numpy as np

def bf16(x):
    x = np.asarray(x, np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return u.view(np.float32)

LANES = np.arange(32)
G, TQ = LANES >> 2, LANES & 3
MI = LANES >> 3

def ldmatrix_x4(smem, offs, trans=False):
    regs = []
    for i in range(4):
        rows = offs[8 * i: 8 * i + 8]
        M = np.stack([smem[r: r + 8] for r in rows])  # 8x8
        if not trans:
            regs.append(np.stack([M[G, TQ * 2], M[G, TQ * 2 + 1]], 1))
        else:
            regs.append(np.stack([M[TQ * 2, G], M[TQ * 2 + 1, G]], 1))
    return regs

def mma(c, a, b0, b1):
    A = np.zeros((16, 16)); B = np.zeros((16, 8)); C = np.zeros((16, 8))
    for l in range(32):
        g, t = l >> 2, l & 3
        A[g, 2*t:2*t+2] = a[0][l]; A[g+8, 2*t:2*t+2] = a[1][l]
        A[g, 2*t+8:2*t+10] = a[2][l]; A[g+8, 2*t+8:2*t+10] = a[3][l]
        B[2*t:2*t+2, g] = b0[l]; B[2*t+8:2*t+10, g] = b1[l]
        C[g, 2*t:2*t+2] = c[l, 0:2]; C[g+8, 2*t:2*t+2] = c[l, 2:4]
    D = A @ B + C
    out = np.zeros((32, 4))
    for l in range(32):
        g, t = l >> 2, l & 3
        out[l, 0:2] = D[g, 2*t:2*t+2]; out[l, 2:4] = D[g+8, 2*t:2*t+2]
    return out

def pack(lo, hi):
    return np.stack([bf16(lo), bf16(hi)], 1)

