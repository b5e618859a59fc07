"""Numbers reported by the papers (and measured from the authors' released 2D code), for checks and tables.

#Params are parameter counts, #FLOPs are MACs in each paper's convention (:mod:`ul3d.profiling`).
"""

#: UltraLightUNet Table 9: 2D at 3×256², 1 class — variant: (params, MACs)
ULTRALIGHTUNET_2D = {"T": (0.027e6, 0.062e9), "S": (0.093e6, 0.125e9), "base": (0.316e6, 0.314e9),
                     "M": (1.15e6, 0.951e9), "L": (3.76e6, 3.19e9)}
#: UltraLightUNet Table 10: 3D at 96³ — variant: (params, MACs)
ULTRALIGHTUNET_3D = {"T": (0.061e6, 1.45e9), "S": (0.163e6, 2.03e9), "base": (0.453e6, 3.42e9),
                     "M": (1.42e6, 7.1e9), "L": (4.28e6, 18.0e9)}
#: The released 2D code (SLDGroup/MK-UNet) at 3×256², 1 class, measured: exact params, ptflops module-hook MACs
RELEASED_2D = {"T": (27_384, 0.0622e9), "S": (93_050, 0.1247e9), "base": (315_566, 0.3138e9),
               "M": (1_150_166, 0.9510e9), "L": (3_758_118, 3.1946e9)}
#: AULUNet (v3, the released configuration) at 3×256², 1 class: (params, MACs in thop's convention)
AULUNET_2D = (0.029e6, 0.069e9)
AULUNET_RELEASED_PARAMS = 28_636

#: UltraLightUNet Tables 4–8 (2D base, 3×256², 1 class): row -> (UltraLightUNet arguments, params, MACs)
ABLATIONS = {
    "T4 Mobile UNet (IRB, no GAG, no MKIRA)": (dict(block="irb", skip_gate=None, decoder_attention=False), 0.271e6, 0.230e9),
    "T4 MKIR": (dict(skip_gate=None, decoder_attention=False), 0.306e6, 0.300e9),
    "T4 MKIR + GAG": (dict(decoder_attention=False), 0.310e6, 0.311e9),
    "T4 MKIR + MKIRA": (dict(skip_gate=None), 0.311e6, 0.303e9),
    "T4 MKIR + GAG + MKIRA": (dict(), 0.316e6, 0.314e9),
    "T6 IRB": (dict(block="irb", skip_gate=None, decoder_attention=False), 0.271e6, 0.230e9),
    "T6 MKIR": (dict(skip_gate=None, decoder_attention=False), 0.306e6, 0.300e9),
    "T7 MKIRA in encoder and decoder": (dict(encoder_attention=True), 0.321e6, 0.346e9),
    "T7 MKIR encoder, MKIRA decoder": (dict(), 0.316e6, 0.314e9),
    "T8 AG": (dict(skip_gate="ag"), 0.326e6, 0.320e9),
    "T8 GAG": (dict(skip_gate="gag"), 0.316e6, 0.314e9),
}
_TABLE5 = {
    (1,): (0.272e6, 0.220e9), (1, 1): (0.275e6, 0.229e9), (3,): (0.281e6, 0.239e9), (1, 3): (0.284e6, 0.248e9),
    (1, 1, 3): (0.288e6, 0.257e9), (3, 3): (0.294e6, 0.267e9), (1, 3, 3): (0.297e6, 0.276e9),
    (5,): (0.299e6, 0.276e9), (1, 5): (0.303e6, 0.286e9), (3, 3, 3): (0.306e6, 0.295e9),
    (3, 5): (0.312e6, 0.304e9), (1, 3, 5): (0.316e6, 0.314e9), (5, 5): (0.331e6, 0.342e9),
    (5, 5, 5): (0.362e6, 0.408e9),
}
ABLATIONS.update({f"T5 kernels {list(k)}": (dict(kernels=k), p, f) for k, (p, f) in _TABLE5.items()})
