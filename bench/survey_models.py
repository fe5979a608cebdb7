"""The survey's model list (bench/survey.py): per timm family with attention, its smallest variants at a
default input of at most 256 px (naflexvit, which has none smaller, at 384), plus variants that exercise
different code paths (distilled heads, registers, rope, relative positions, parallel blocks, hybrids); and the
three one-shot specs every model goes through."""
from __future__ import annotations

from typing import Any

SPECS: dict[str, dict[str, Any]] = {
    "width": {"budget": {"flops": 0.5}, "width": {"method": "magnitude", "heads": True, "mlp": True}},
    "depth": {"budget": {"flops": 0.7}, "width": {"method": "magnitude", "heads": True, "mlp": True},
              "depth": {"skip_blocks": True}},
    "tokens": {"budget": {"flops": 0.6}, "tokens": {"method": "attention"}},
}
HEADERS = {"width": "width 0.5", "depth": "depth+width 0.7", "tokens": "tokens 0.6"}

# (family, timm names): smallest first, then variants with other code paths. Fixed order = table order.
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("test (timm's tiny test models)", ("test_vit", "test_vit2", "test_vit3", "test_vit4", "test_vit_relpos")),
    ("vit", ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_small_patch32_224", "vit_small_patch8_224",
             "vit_small_patch16_18x2_224", "vit_small_patch16_36x1_224", "vit_base_patch32_224")),
    ("vit (hybrid)", ("vit_tiny_r_s16_p8_224", "vit_small_r26_s32_224", "vit_small_resnet26d_224")),
    ("vit (registers, gap)", ("vit_wee_patch16_reg1_gap_256", "vit_pwee_patch16_reg1_gap_256",
                              "vit_dwee_patch16_reg1_gap_256", "vit_dpwee_patch16_reg1_gap_256",
                              "vit_little_patch16_reg1_gap_256", "vit_little_patch16_reg4_gap_256",
                              "vit_dlittle_patch16_reg1_gap_256", "vit_medium_patch16_reg4_gap_256",
                              "vit_betwixt_patch16_reg4_gap_256", "vit_medium_patch16_gap_240")),
    ("vit (rope)", ("vit_small_patch16_rope_224", "vit_small_patch16_rope_mixed_224",
                    "vit_small_patch16_rope_ape_224", "vit_medium_patch16_rope_reg1_gap_256")),
    ("vit (dinov3)", ("vit_small_patch16_dinov3", "vit_tiny_patch16_dinov3_qkvb")),
    ("vit (clip, siglip)", ("vit_medium_patch32_clip_224", "vit_base_patch32_clip_224",
                            "vit_base_patch32_siglip_256")),
    ("vit_relpos", ("vit_relpos_small_patch16_224", "vit_relpos_small_patch16_rpn_224",
                    "vit_relpos_medium_patch16_cls_224")),
    ("vit_srelpos", ("vit_srelpos_small_patch16_224",)),
    ("flexivit", ("flexivit_small",)),
    ("naflexvit", ("naflexvit_base_patch16_gap",)),
    ("deit", ("deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "deit_small_patch16_224",
              "deit_small_distilled_patch16_224")),
    ("deit3", ("deit3_small_patch16_224", "deit3_medium_patch16_224")),
    ("beit", ("beit_base_patch16_224",)),
    ("beitv2", ("beitv2_base_patch16_224",)),
    ("beit3", ("beit3_base_patch16_224",)),
    ("eva02", ("eva02_tiny_patch14_224", "eva02_small_patch14_224")),
    ("cait", ("cait_xxs24_224", "cait_xxs36_224")),
    ("xcit", ("xcit_nano_12_p16_224", "xcit_nano_12_p8_224", "xcit_tiny_12_p16_224", "xcit_tiny_24_p16_224")),
    ("samvit", ("samvit_base_patch16_224",)),
    ("swin", ("swin_tiny_patch4_window7_224", "swin_s3_tiny_224")),
    ("swinv2", ("swinv2_tiny_window8_256", "swinv2_tiny_window16_256")),
    ("swinv2_cr", ("swinv2_cr_tiny_224", "swinv2_cr_tiny_ns_224")),
    ("maxvit", ("test_maxvit", "maxvit_pico_rw_256", "maxvit_rmlp_pico_rw_256", "maxvit_nano_rw_256",
                "maxvit_tiny_tf_224")),
    ("maxxvit", ("maxxvit_rmlp_nano_rw_256", "maxxvitv2_nano_rw_256")),
    ("coatnet", ("test_coatnet", "coatnet_pico_rw_224", "coatnet_nano_rw_224", "coatnet_rmlp_nano_rw_224",
                 "coatnext_nano_rw_224")),
    ("coat", ("coat_lite_tiny", "coat_lite_mini", "coat_tiny")),
    ("crossvit", ("crossvit_tiny_240", "crossvit_9_240", "crossvit_9_dagger_240")),
    ("convit", ("convit_tiny", "convit_small")),
    ("pit", ("pit_ti_224", "pit_ti_distilled_224", "pit_xs_224")),
    ("levit", ("levit_128s", "levit_128", "levit_conv_128s")),
    ("mvitv2", ("mvitv2_tiny", "mvitv2_small_cls")),
    ("twins", ("twins_pcpvt_small", "twins_svt_small")),
    ("pvt_v2", ("pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2_li")),
    ("tnt", ("tnt_s_patch16_224",)),
    ("volo", ("volo_d1_224",)),
    ("nest", ("nest_tiny", "nest_tiny_jx")),
    ("efficientformer", ("efficientformer_l1",)),
    ("efficientformerv2", ("efficientformerv2_s0", "efficientformerv2_s1")),
    ("fastvit (attention stages)", ("fastvit_sa12", "fastvit_mci0")),
    ("hiera", ("hiera_tiny_224", "hiera_small_abswin_256", "hieradet_small")),
    ("davit", ("davit_tiny",)),
    ("gcvit", ("gcvit_xxtiny", "gcvit_xtiny")),
    ("nextvit", ("nextvit_small",)),
    ("mobilevit", ("mobilevit_xxs", "mobilevit_xs")),
    ("mobilevitv2", ("mobilevitv2_050",)),
    ("edgenext", ("edgenext_xx_small", "edgenext_x_small")),
    ("visformer", ("visformer_tiny",)),
    ("tiny_vit", ("tiny_vit_5m_224",)),
    ("vitamin", ("vitamin_small_224",)),
    ("efficientvit", ("efficientvit_m0", "efficientvit_b0")),
    ("shvit", ("shvit_s1",)),
    ("swiftformer", ("swiftformer_xs",)),
    ("iformer", ("iformer_t",)),
    ("lowformer", ("lowformer_b0",)),
    ("caformer", ("caformer_s18",)),
    ("attention in ResNets", ("botnet26t_256", "halonet26t", "lambda_resnet26rpt_256", "bat_resnext26ts")),
)


def survey_models(check: bool = True) -> tuple[list[str], list[str]]:
    """The survey's models in table order, and the names of :data:`FAMILIES` the installed timm lacks."""
    names = [name for _, members in FAMILIES for name in members]
    if not check:
        return names, []
    import timm

    known = set(timm.list_models())
    return [n for n in names if n in known], [n for n in names if n not in known]
