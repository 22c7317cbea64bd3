//! Tokenizer and chat template against transformers (`tests/fixtures/tokenizer_cases.json`, made
//! by `scripts/reference/make_fixtures.py` with the fixtures' tokenizer).

mod common;

use deltaserve_model::{ChatMessage, TextCodec};

fn cases() -> serde_json::Value {
    let p = common::fixtures_dir().join("tokenizer_cases.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn codec() -> TextCodec {
    TextCodec::from_dir(&common::model_dir("llama"), &[]).unwrap()
}

#[test]
fn encode_and_decode_match_transformers() {
    let c = codec();
    for case in cases()["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(c.encode(text, true).unwrap(), ids, "encode {text:?}");
        assert_eq!(
            c.decode(&ids).unwrap(),
            case["decoded_skip_special"].as_str().unwrap(),
            "decode {text:?}"
        );
    }
}

#[test]
fn chat_template_renders_like_transformers() {
    let c = codec();
    for case in cases()["chat"].as_array().unwrap() {
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let rendered = c.render_chat(&messages, gen).unwrap();
        assert_eq!(rendered, case["rendered"].as_str().unwrap());
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(c.encode(&rendered, false).unwrap(), ids);
    }
}

#[test]
fn stop_ids_come_from_generation_config() {
    let c =
        TextCodec::from_dir(&common::fixtures_dir().join("../../assets/demo/base"), &[]).unwrap();
    assert_eq!(c.stop_ids(), &[0, 3]);
}
