//! Which modules a config adapts, with which rank, alpha and scale (PEFT's rules).
use std::collections::BTreeMap;

use llmft_lora::{InitLoraWeights, LayerIndices, LoraConfig, NamesOrPattern, OneOrMany};

fn names(v: &[&str]) -> Option<NamesOrPattern> {
    Some(NamesOrPattern::Names(
        v.iter().map(|s| s.to_string()).collect(),
    ))
}

const Q3: &str = "model.layers.3.self_attn.q_proj";

#[test]
fn names_match_whole_or_dotted_suffix() {
    let c = LoraConfig {
        target_modules: names(&["q_proj", "mlp.down_proj"]),
        ..LoraConfig::default()
    };
    assert!(c.is_targeted(Q3).unwrap());
    assert!(c.is_targeted("model.layers.0.mlp.down_proj").unwrap());
    assert!(!c.is_targeted("model.layers.0.self_attn.qq_proj").unwrap());
    assert!(!c.is_targeted("model.layers.0.self_attn.k_proj").unwrap());
    assert!(c.is_targeted("q_proj").unwrap());
}

#[test]
fn a_string_is_a_full_match_regex_and_all_linear_skips_the_head() {
    let c = LoraConfig {
        target_modules: Some(NamesOrPattern::Pattern(r".*\.(q|v)_proj".into())),
        ..LoraConfig::default()
    };
    assert!(c.is_targeted(Q3).unwrap());
    assert!(!c.is_targeted("model.layers.3.self_attn.k_proj").unwrap());
    assert!(!c.is_targeted("model.layers.3.self_attn.q_proj.x").unwrap());

    let c = LoraConfig {
        target_modules: Some(NamesOrPattern::Pattern("all-linear".into())),
        ..LoraConfig::default()
    };
    assert!(c.is_all_linear());
    assert!(c.is_targeted("model.layers.0.mlp.gate_proj").unwrap());
    assert!(!c.is_targeted("lm_head").unwrap());

    let bad = LoraConfig {
        target_modules: Some(NamesOrPattern::Pattern("(".into())),
        ..LoraConfig::default()
    };
    assert!(bad
        .is_targeted(Q3)
        .unwrap_err()
        .to_string()
        .contains("target_modules"));
}

#[test]
fn exclude_and_layers_to_transform() {
    let mut c = LoraConfig {
        target_modules: names(&["q_proj", "v_proj"]),
        exclude_modules: names(&["layers.3.self_attn.v_proj"]),
        ..LoraConfig::default()
    };
    assert!(!c.is_targeted("model.layers.3.self_attn.v_proj").unwrap());
    assert!(c.is_targeted("model.layers.2.self_attn.v_proj").unwrap());

    c.layers_to_transform = Some(LayerIndices::List(vec![0, 3]));
    assert!(c.is_targeted(Q3).unwrap());
    assert!(!c.is_targeted("model.layers.1.self_attn.q_proj").unwrap());
    assert!(!c.is_targeted("model.layers.13.self_attn.q_proj").unwrap());
    c.layers_to_transform = Some(LayerIndices::One(1));
    assert!(c.is_targeted("model.layers.1.self_attn.q_proj").unwrap());
    assert!(!c.is_targeted(Q3).unwrap());

    // The first numbered segment is the layer, not a nested index.
    c.layers_to_transform = Some(LayerIndices::One(2));
    assert!(c.is_targeted("model.layers.2.experts.5.q_proj").unwrap());
    c.layers_pattern = Some(OneOrMany::One("experts".into()));
    assert!(!c.is_targeted("model.layers.2.experts.5.q_proj").unwrap());
    c.layers_to_transform = Some(LayerIndices::One(5));
    assert!(c.is_targeted("model.layers.2.experts.5.q_proj").unwrap());
}

#[test]
fn rank_and_alpha_patterns_and_scales() {
    let c = LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        target_modules: names(&["q_proj", "v_proj", "down_proj"]),
        rank_pattern: BTreeMap::from([
            ("v_proj".into(), 4),
            (r"layers\.3\.self_attn\.q_proj".into(), 2),
        ]),
        alpha_pattern: BTreeMap::from([("down_proj".into(), 4.0)]),
        ..LoraConfig::default()
    };
    let t = |n: &str| c.target(n).unwrap().unwrap();
    assert_eq!(
        (
            t("model.layers.0.self_attn.q_proj").r,
            t("model.layers.0.self_attn.q_proj").scale
        ),
        (8, 2.0)
    );
    assert_eq!(t(Q3).r, 2);
    assert_eq!(t(Q3).scale, 8.0);
    assert_eq!(t("model.layers.0.self_attn.v_proj").r, 4);
    let d = t("model.layers.0.mlp.down_proj");
    assert_eq!((d.r, d.alpha, d.scale), (8, 4.0, 0.5));
    // A pattern key matches after a dot only: "proj" does not match "q_proj".
    let c2 = LoraConfig {
        rank_pattern: BTreeMap::from([("proj".into(), 1)]),
        ..c.clone()
    };
    assert_eq!(c2.target(Q3).unwrap().unwrap().r, 8);

    let rs = LoraConfig {
        use_rslora: true,
        ..c.clone()
    };
    assert_eq!(
        rs.target("model.layers.0.self_attn.q_proj")
            .unwrap()
            .unwrap()
            .scale,
        16.0 / 8f32.sqrt()
    );
    assert!(c
        .target("model.layers.0.self_attn.k_proj")
        .unwrap()
        .is_none());
}

#[test]
fn init_lora_weights_serde_and_validation() {
    for (json, want) in [
        ("true", InitLoraWeights::Kaiming),
        ("false", InitLoraWeights::Random),
        ("\"gaussian\"", InitLoraWeights::Gaussian),
        ("\"pissa\"", InitLoraWeights::Other("pissa".into())),
    ] {
        let c: LoraConfig =
            serde_json::from_str(&format!("{{\"init_lora_weights\": {json}}}")).unwrap();
        assert_eq!(c.init_lora_weights, want);
        let back = serde_json::to_value(&c).unwrap();
        assert_eq!(back["init_lora_weights"].to_string(), json);
    }
    let ok = LoraConfig {
        target_modules: names(&["q_proj"]),
        ..LoraConfig::default()
    };
    ok.validate().unwrap();
    for bad in [
        LoraConfig { r: 0, ..ok.clone() },
        LoraConfig {
            lora_dropout: 1.0,
            ..ok.clone()
        },
        LoraConfig {
            bias: "all".into(),
            ..ok.clone()
        },
        LoraConfig {
            fan_in_fan_out: true,
            ..ok.clone()
        },
        LoraConfig {
            target_modules: None,
            ..ok.clone()
        },
        LoraConfig {
            modules_to_save: Some(vec!["lm_head".into()]),
            ..ok.clone()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}
