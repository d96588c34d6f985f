//! `ln(x)` in f64 for the one logarithm each row needs (`lse = m + ln(sum of exps)`).
//!
//! The log's latency sits on every row's critical path (the row's sums are reduced, then the
//! log, then the loss), so this one is built for a short dependency chain rather than for the
//! last bit: a table lookup and six multiply-adds, where `libm::log` (fdlibm's) has a division
//! and a longer polynomial. A `forward_backward` call at [128×1000] spent about a tenth of its
//! time waiting on `libm::log` (a side timing with the log replaced by a multiply: 43 against
//! 38 µs); this log gives back about half of that (41 against 39 µs).
//!
//! Method (Tang's table-driven log): for a positive normal `x = 2^e * m`, `m` in `[1, 2)`,
//! 1. `j` = `m`'s fraction rounded to 7 bits, so `m` lies within `2^-8` of `c_j = 1 + j / 128`
//!    (`j` from 0 to 128);
//! 2. `r = m * inv_j - 1`, `inv_j` the f64 nearest to `1 / c_j` (`|r| <= 2^-8`; the product is
//!    near 1, so its rounding is an error of at most `2^-53` and the subtraction is exact);
//! 3. `ln(x) = e ln2 + ln(1 / inv_j) + ln(1 + r)`, the middle term from a table of 129 values
//!    computed once (offline, at 200 bits) and rounded to f64, the last from its Taylor series
//!    to `r^6`, whose first omitted term is below `2^-56 / 7`.
//!
//! Error: below `1e-15` relative plus `2e-16` absolute against `libm::log` from 1 up, where
//! every sum of exps lies, and `4e-16` absolute below 1 (the sum `e ln2 + ln(1 / inv_j)` can
//! cancel there); checked by a test. That is a billion times below what the loss's tolerance
//! (`2e-6`) could notice. `ln(1) = 0` exactly. Zero, negative, subnormal, infinite and NaN
//! arguments go to `libm::log`.

/// `ln(2)` (`0x3fe62e42_fefa39ef`).
const LN2: f64 = core::f64::consts::LN_2;

/// Per `j`: the bits of `inv_j`, the f64 nearest `1 / c_j` with `c_j = 1 + j / 128`, and of the f64
/// nearest `ln(1 / inv_j)` (so `j = 0` is exactly `(1, 0)` and `j = 128` exactly `(1/2, LN2)`).
const TABLE: [(u64, u64); 129] = [
    (0x3ff0_0000_0000_0000, 0x0000_0000_0000_0000),
    (0x3fef_c07f_01fc_07f0, 0x3f7f_e02a_6b10_6799),
    (0x3fef_81f8_1f81_f820, 0x3f8f_c0a8_b0fc_03c4),
    (0x3fef_4465_9e4a_4271, 0x3f97_b91b_07d5_b126),
    (0x3fef_07c1_f07c_1f08, 0x3f9f_829b_0e78_32f8),
    (0x3fee_cc07_b301_ecc0, 0x3fa3_9e87_b9fe_bd68),
    (0x3fee_9131_abf0_b767, 0x3fa7_7458_f632_dcff),
    (0x3fee_573a_c901_e574, 0x3fab_42dd_7119_71b9),
    (0x3fee_1e1e_1e1e_1e1e, 0x3faf_0a30_c011_62a8),
    (0x3fed_e5d6_e3f8_868a, 0x3fb1_6536_eea3_7ae3),
    (0x3fed_ae60_76b9_81db, 0x3fb3_41d7_961b_d1d0),
    (0x3fed_77b6_54b8_2c34, 0x3fb5_1b07_3f06_183c),
    (0x3fed_41d4_1d41_d41d, 0x3fb6_f0d2_8ae5_6b4e),
    (0x3fed_0cb5_8f6e_c074, 0x3fb8_c345_d631_9b23),
    (0x3fec_d856_8903_9b0b, 0x3fba_926d_3a4a_d562),
    (0x3fec_a4b3_055e_e191, 0x3fbc_5e54_8f5b_c743),
    (0x3fec_71c7_1c71_c71c, 0x3fbe_2707_6e2a_f2ea),
    (0x3fec_3f8f_01c3_f8f0, 0x3fbf_ec91_31db_eabc),
    (0x3fec_0e07_0381_c0e0, 0x3fc0_d77e_7cd0_8e5b),
    (0x3feb_dd2b_8994_06f7, 0x3fc1_b72a_d52f_67a2),
    (0x3feb_acf9_14c1_bad0, 0x3fc2_9552_f81f_f521),
    (0x3feb_7d6c_3dda_338b, 0x3fc3_71fc_201e_8f75),
    (0x3feb_4e81_b4e8_1b4f, 0x3fc4_4d2b_6ccb_7d1c),
    (0x3feb_2036_406c_80d9, 0x3fc5_26e5_e3a1_b438),
    (0x3fea_f286_bca1_af28, 0x3fc5_ff30_70a7_93d6),
    (0x3fea_c570_1ac5_701b, 0x3fc6_d60f_e719_d21b),
    (0x3fea_98ef_606a_63be, 0x3fc7_ab89_0210_d907),
    (0x3fea_6d01_a6d0_1a6d, 0x3fc8_7fa0_6520_c911),
    (0x3fea_41a4_1a41_a41a, 0x3fc9_525a_9cf4_56b6),
    (0x3fea_16d3_f97a_4b02, 0x3fca_23bc_1fe2_b561),
    (0x3fe9_ec8e_9510_33d9, 0x3fca_f3c9_4e80_bff3),
    (0x3fe9_c2d1_4ee4_a102, 0x3fcb_c286_742d_8cd4),
    (0x3fe9_9999_9999_999a, 0x3fcc_8ff7_c79a_9a20),
    (0x3fe9_70e4_f80c_b872, 0x3fcd_5c21_6b4f_bb94),
    (0x3fe9_48b0_fcd6_e9e0, 0x3fce_2707_6e2a_f2e8),
    (0x3fe9_20fb_49d0_e229, 0x3fce_f0ad_cbdc_5935),
    (0x3fe8_f9c1_8f9c_18fa, 0x3fcf_b918_6d5e_3e29),
    (0x3fe8_d301_8d30_18d3, 0x3fd0_4025_94b4_d041),
    (0x3fe8_acb9_0f6b_f3aa, 0x3fd0_a324_e273_90e2),
    (0x3fe8_86e5_f0ab_b04a, 0x3fd1_058b_f9ae_4ad4),
    (0x3fe8_6186_1861_8618, 0x3fd1_675c_abab_a60f),
    (0x3fe8_3c97_7ab2_bedd, 0x3fd1_c898_c169_99fb),
    (0x3fe8_1818_1818_1818, 0x3fd2_2941_fbcf_7966),
    (0x3fe7_f405_fd01_7f40, 0x3fd2_895a_13de_86a4),
    (0x3fe7_d05f_417d_05f4, 0x3fd2_e8e2_bae1_1d31),
    (0x3fe7_ad22_08e0_ecc3, 0x3fd3_47dd_9a98_7d56),
    (0x3fe7_8a4c_8178_a4c8, 0x3fd3_a64c_5569_45ea),
    (0x3fe7_67dc_e434_a9b1, 0x3fd4_0430_8686_a7e4),
    (0x3fe7_45d1_745d_1746, 0x3fd4_618b_c21c_5ec2),
    (0x3fe7_2428_7f46_debc, 0x3fd4_be5f_9577_78a1),
    (0x3fe7_02e0_5c0b_8170, 0x3fd5_1aad_872d_f82e),
    (0x3fe6_e1f7_6b43_37c7, 0x3fd5_7677_1745_5a6c),
    (0x3fe6_c16c_16c1_6c17, 0x3fd5_d1bd_bf58_09ca),
    (0x3fe6_a13c_d153_7290, 0x3fd6_2c82_f2b9_c796),
    (0x3fe6_8168_1681_6817, 0x3fd6_86c8_1e9b_14ad),
    (0x3fe6_61ec_6a51_22f9, 0x3fd6_e08e_aa2b_a1e4),
    (0x3fe6_42c8_590b_2164, 0x3fd7_39d7_f6bb_d007),
    (0x3fe6_23fa_7701_6240, 0x3fd7_92a5_5fdd_47a1),
    (0x3fe6_0581_6058_1606, 0x3fd7_eaf8_3b82_afc2),
    (0x3fe5_e75b_b8d0_15e7, 0x3fd8_42d1_da1e_8b18),
    (0x3fe5_c988_2b93_1057, 0x3fd8_9a33_86c1_425b),
    (0x3fe5_ac05_6b01_5ac0, 0x3fd8_f11e_8736_62c8),
    (0x3fe5_8ed2_3081_58ed, 0x3fd9_4794_1c21_16fb),
    (0x3fe5_71ed_3c50_6b3a, 0x3fd9_9d95_8117_e08a),
    (0x3fe5_5555_5555_5555, 0x3fd9_f323_ecbf_984d),
    (0x3fe5_3909_48f4_0feb, 0x3fda_4840_90e5_bb09),
    (0x3fe5_1d07_eae2_f815, 0x3fda_9cec_9a9a_084a),
    (0x3fe5_0150_1501_5015, 0x3fda_f129_3247_786b),
    (0x3fe4_e5e0_a72f_0539, 0x3fdb_44f7_7bcc_8f64),
    (0x3fe4_cab8_8725_af6e, 0x3fdb_9858_9693_10fd),
    (0x3fe4_afd6_a052_bf5b, 0x3fdb_eb4d_9da7_1b7a),
    (0x3fe4_9539_e3b2_d067, 0x3fdc_3dd7_a7cd_ad4d),
    (0x3fe4_7ae1_47ae_147b, 0x3fdc_8ff7_c79a_9a21),
    (0x3fe4_60cb_c7f5_cf9a, 0x3fdc_e1af_0b85_f3ec),
    (0x3fe4_46f8_6562_d9fb, 0x3fdd_32fe_7e00_ebd5),
    (0x3fe4_2d66_25d5_1f87, 0x3fdd_83e7_258a_2f3e),
    (0x3fe4_1414_1414_1414, 0x3fdd_d46a_04c1_c4a1),
    (0x3fe3_fb01_3fb0_13fb, 0x3fde_2488_1a7c_6c26),
    (0x3fe3_e22c_bce4_a902, 0x3fde_7442_61d6_8789),
    (0x3fe3_c995_a47b_abe7, 0x3fde_c399_d246_8cc1),
    (0x3fe3_b13b_13b1_3b14, 0x3fdf_128f_5faf_06ec),
    (0x3fe3_991c_2c18_7f63, 0x3fdf_6123_fa70_28ad),
    (0x3fe3_8138_1381_3814, 0x3fdf_af58_8f78_f31d),
    (0x3fe3_698d_f3de_0748, 0x3fdf_fd2e_0857_f497),
    (0x3fe3_521c_fb2b_78c1, 0x3fe0_2552_a5a5_d0ff),
    (0x3fe3_3ae4_5b57_bcb2, 0x3fe0_4bdf_9da9_26d2),
    (0x3fe3_23e3_4a2b_10bf, 0x3fe0_723e_5c1c_df41),
    (0x3fe3_0d19_0130_d190, 0x3fe0_986f_4f57_3521),
    (0x3fe2_f684_bda1_2f68, 0x3fe0_be72_e425_2a83),
    (0x3fe2_e025_c04b_8097, 0x3fe0_e449_85d1_cc8c),
    (0x3fe2_c9fb_4d81_2ca0, 0x3fe1_09f3_9e2d_4c96),
    (0x3fe2_b404_ad01_2b40, 0x3fe1_2f71_9593_efbd),
    (0x3fe2_9e41_29e4_129e, 0x3fe1_54c3_d2f4_d5ea),
    (0x3fe2_88b0_1288_b013, 0x3fe1_79ea_bbd8_99a0),
    (0x3fe2_7350_b881_2735, 0x3fe1_9ee6_b467_c96f),
    (0x3fe2_5e22_7080_92f1, 0x3fe1_c3b8_1f71_3c25),
    (0x3fe2_4924_9249_2492, 0x3fe1_e85f_5e70_40d1),
    (0x3fe2_3456_789a_bcdf, 0x3fe2_0cdc_d192_ab6e),
    (0x3fe2_1fb7_8121_fb78, 0x3fe2_3130_d7be_bf43),
    (0x3fe2_0b47_0c67_c0d9, 0x3fe2_555b_ce98_f7ca),
    (0x3fe1_f704_7dc1_1f70, 0x3fe2_795e_1289_b11b),
    (0x3fe1_e2ef_3b3f_b874, 0x3fe2_9d37_fec2_b08b),
    (0x3fe1_cf06_ada2_811d, 0x3fe2_c0e9_ed44_8e8c),
    (0x3fe1_bb4a_4046_ed29, 0x3fe2_e474_36e4_0268),
    (0x3fe1_a7b9_611a_7b96, 0x3fe3_07d7_334f_10be),
    (0x3fe1_9453_808c_a29c, 0x3fe3_2b13_3912_1d71),
    (0x3fe1_8118_1181_1812, 0x3fe3_4e28_9d9c_e1d2),
    (0x3fe1_6e06_8942_7379, 0x3fe3_7117_b547_47b6),
    (0x3fe1_5b1e_5f75_270d, 0x3fe3_93e0_d356_2a1a),
    (0x3fe1_485f_0e0a_cd3b, 0x3fe3_b684_49ff_fc23),
    (0x3fe1_35c8_1135_c811, 0x3fe3_d902_6a71_56fb),
    (0x3fe1_2358_e75d_3033, 0x3fe3_fb5b_84d1_6f43),
    (0x3fe1_1111_1111_1111, 0x3fe4_1d8f_e846_72af),
    (0x3fe0_fef0_10fe_f011, 0x3fe4_3f9f_e2f9_ce67),
    (0x3fe0_ecf5_6be6_9c90, 0x3fe4_618b_c21c_5ec2),
    (0x3fe0_db20_a88f_4696, 0x3fe4_8353_d1ea_88df),
    (0x3fe0_c971_4fbc_da3b, 0x3fe4_a4f8_5db0_3ebb),
    (0x3fe0_b7e6_ec25_9dc8, 0x3fe4_c679_afcc_ee39),
    (0x3fe0_a681_0a68_10a7, 0x3fe4_e7d8_11b7_5bb0),
    (0x3fe0_953f_3901_0954, 0x3fe5_0913_cc01_686b),
    (0x3fe0_8421_0842_1084, 0x3fe5_2a2d_265b_c5ab),
    (0x3fe0_7326_0a47_f7c6, 0x3fe5_4b24_6799_9498),
    (0x3fe0_624d_d2f1_a9fc, 0x3fe5_6bf9_d5b3_f399),
    (0x3fe0_5197_f7d7_3404, 0x3fe5_8cad_b5cd_7989),
    (0x3fe0_4104_1041_0410, 0x3fe5_ad40_4c35_9f2d),
    (0x3fe0_3091_b51f_5e1a, 0x3fe5_cdb1_dc6c_1765),
    (0x3fe0_2040_8102_0408, 0x3fe5_ee02_a924_1676),
    (0x3fe0_1010_1010_1010, 0x3fe6_0e32_f447_88d9),
    (0x3fe0_0000_0000_0000, 0x3fe6_2e42_fefa_39ef),
];

/// `ln(x)` to within `1e-15` relative plus `2e-16` absolute for every finite `x >= 1` (`4e-16`
/// absolute for positive normal `x < 1`); `libm::log(x)` for every other `x`.
#[inline(always)]
pub(crate) fn ln(x: f64) -> f64 {
    let bits = x.to_bits();
    let biased_exponent = bits >> 52;
    // Sign bit clear, exponent neither 0 (zero, subnormal) nor 2047 (inf, NaN).
    if biased_exponent == 0 || biased_exponent >= 0x7ff {
        return libm::log(x);
    }
    let e = biased_exponent as i32 - 0x3ff;
    let m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    // The fraction's top 8 bits, halved with rounding: at most 128 by construction (the
    // fallback is never taken).
    let (inv, ln_c) = TABLE
        .get((((bits >> 44) & 0xff) + 1) as usize >> 1)
        .map_or((1.0, 0.0), |&(inv, ln_c)| {
            (f64::from_bits(inv), f64::from_bits(ln_c))
        });
    // `m * inv` is within 2^-8 of 1: subtracting 1 is exact, the product's rounding (2^-53) is
    // the reduction's only error. (No fma: `core` has none, and a default x86_64 build no FMA.)
    let r = m * inv - 1.0;
    // r - r^2/2 + r^3/3 - r^4/4 + r^5/5 - r^6/6, as r + r^2 (a + r^2 (b - r^2/6)).
    let a = r * (1.0 / 3.0) - 0.5;
    let b = r * 0.2 - 0.25;
    let r2 = r * r;
    let log1p = r2 * (r2 * (b - r2 * (1.0 / 6.0)) + a) + r;
    (f64::from(e) * LN2 + ln_c) + log1p
}

#[cfg(test)]
mod tests {
    use super::ln;

    /// `ln(x)` within `1e-15` relative plus `2e-16` absolute (`4e-16` below 1) of
    /// `libm::log(x)`, itself within 1 ulp of the exact value.
    fn close(x: f64) {
        let (got, want) = (ln(x), libm::log(x));
        let absolute = if x < 1.0 { 4e-16 } else { 2e-16 };
        assert!(
            (got - want).abs() <= 1e-15 * want.abs() + absolute,
            "ln({x:e}) = {got:e}, libm::log gives {want:e}"
        );
    }

    #[test]
    fn close_to_libm_on_a_sweep_of_every_exponent() {
        // Every binade from 2^-1022 to 2^1023, with mantissas spread through it.
        let mut bits = 0x0010_0000_0000_0000_u64;
        while bits < 0x7ff0_0000_0000_0000 {
            close(f64::from_bits(bits));
            bits += 0x0000_0123_4567_89ab;
        }
        // Every table entry, at and around the points where the rounded index changes, for
        // the sums of exps a row of up to 2^24 classes gives and just below 1.
        for e in [-1, 0, 1, 10, 24] {
            for j in 0..=256_u64 {
                let m = f64::from_bits(0x3ff0_0000_0000_0000 | (j << 44));
                let x = m * libm::exp2(f64::from(e));
                for d in [-2_i64, -1, 0, 1, 2] {
                    close(f64::from_bits(x.to_bits().wrapping_add_signed(d)));
                }
            }
        }
        // Dense near 1, where the result is tiny.
        let mut d = 1e-16_f64;
        while d < 0.01 {
            close(1.0 + d);
            close(1.0 - d);
            d *= 1.1;
        }
    }

    #[test]
    fn special_arguments_take_libm() {
        for x in [
            0.0,
            -0.0,
            -1.0,
            f64::MIN_POSITIVE / 4.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            assert_eq!(ln(x).to_bits(), libm::log(x).to_bits(), "ln({x:e})");
        }
        assert!(ln(f64::NAN).is_nan());
        assert_eq!(ln(1.0), 0.0);
        assert_eq!(ln(0.0), f64::NEG_INFINITY);
        assert_eq!(ln(f64::INFINITY), f64::INFINITY);
        assert!(ln(-1.0).is_nan());
        close(f64::MIN_POSITIVE);
        close(f64::MAX);
    }
}
