//! Token ids and decoding against the reference tokenizer.
mod common;
use common::{fixtures_dir, ids};
use paligemma::config::TokenConfig;
use paligemma::tokenizer::Tokenizer;

fn tokenizer() -> (Tokenizer, serde_json::Value) {
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures_dir().join("tokenizer_cases.json")).unwrap(),
    )
    .unwrap();
    let json = std::fs::read_to_string(fixtures_dir().join("pg2_gqa/hf/tokenizer.json")).unwrap();
    let t = &cases["ids"];
    let id = |k: &str| t[k].as_u64().unwrap() as u32;
    let config = TokenConfig {
        image_token_id: id("image"),
        image_token_count: 16,
        bos: id("bos"),
        eos: id("eos"),
        pad: id("pad"),
        loc_first: Some(id("first_loc")),
        seg_first: Some(id("first_seg")),
    };
    (Tokenizer::from_json(&json, config).unwrap(), cases)
}

#[test]
fn encode_matches_reference() {
    let (tok, cases) = tokenizer();
    let encode = cases["encode"].as_array().unwrap();
    assert!(encode.len() >= 5);
    for case in encode {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text).unwrap(), ids(&case["ids"]), "{text:?}");
    }
}

#[test]
fn prefix_layout_matches_processor() {
    let (tok, _) = tokenizer();
    let reference = common::reference_json("pg2_gqa");
    let got = tok
        .prefix_ids(reference["prompt"].as_str().unwrap())
        .unwrap();
    assert_eq!(got, ids(&reference["input_ids"]));
    let empty = tok.prefix_ids("").unwrap();
    assert_eq!(
        &empty[16..],
        &[2, tok.token_to_id("\n").unwrap()],
        "an empty prompt is <bos> and a newline"
    );
}

#[test]
fn decode_keeps_loc_and_seg_tokens() {
    let (tok, cases) = tokenizer();
    for case in cases["decode"].as_array().unwrap() {
        if case["skip_special_tokens"].as_bool() == Some(true) {
            let text = case["text"].as_str().unwrap();
            assert_eq!(tok.decode(&ids(&case["ids"])).unwrap(), text);
        }
    }
    // Ids past the tokenizer (padding rows of the embedding matrix) are skipped.
    let loc = tok.token_to_id("<loc0005>").unwrap();
    assert_eq!(tok.decode(&[loc, 1855, loc]).unwrap(), "<loc0005><loc0005>");
}

#[test]
fn overlong_prompt_is_an_error() {
    let (tok, _) = tokenizer();
    let err = tok
        .prefix_ids(&"x".repeat(1 << 20))
        .unwrap_err()
        .to_string();
    assert!(err.contains("longer than"), "{err}");
}
