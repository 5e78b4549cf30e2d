"""`fedswarm generate`: a chat folder is asked through its template (system turn, stdin prompt, stop at the
end of turn), --raw continues plain text, and an exported chat-tuned folder picks chat by itself.

The model is a one-layer Llama built here whose next token is a lookup on the current one (one-hot
embeddings, zeroed block outputs, an lm_head that is the table), so what it answers shows what it was fed:
after the template's "<|assistant|>" it says "H", "i", then "<|end|>" (and "Z" after that, if not stopped);
after anything else it says "Z"."""
from __future__ import annotations

import io
import json

import pytest
import torch

from fedswarm.app.cli import main
from fedswarm.app.generate import choose_mode, generate
from fedswarm.sim.tiny_hf import train_tokenizer
from fedswarm.tokenizer import byte_hf_tokenizer

QUESTION = "What is 3 plus 4?"
TABLE = {"<|assistant|>": "H", "H": "i", "i": "<|end|>", "<|end|>": "Z"}


def lookup_llama(folder, texts):
    """Save a tokenizer with a chat template and a Llama whose greedy next token is TABLE[current] (else "Z")."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_tokenizer(texts, vocab_size=300)
    vocab = len(tok)
    hidden = -(-vocab // 8) * 8
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         bos_token_id=0, eos_token_id=0, pad_token_id=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    ids = lambda t: tok.convert_tokens_to_ids(t)  # noqa: E731
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab, hidden))
        for layer in model.model.layers:   # the blocks add nothing to the residual stream
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = torch.zeros(vocab, hidden)
        head[ids("Z"), :vocab] = 0.5
        for src, dst in TABLE.items():
            head[ids(dst), ids(src)] = 1.0
        model.lm_head.weight.copy_(head)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, tok


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    return lookup_llama(tmp_path_factory.mktemp("chat") / "llama", [QUESTION, "3 plus 4 is 7. Hi, Z."] * 20)


def test_chat_template_is_what_the_model_gets_and_the_answer_stops_at_end_of_turn(chat_folder):
    folder, tok = chat_folder
    sample = generate(str(folder), QUESTION, max_new_tokens=8)
    assert sample.chat
    expected = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
    assert sample.prompt_ids == list(expected)
    assert sample.prompt_text == f"<|user|>{QUESTION}<|end|><|assistant|>"
    assert tok.convert_tokens_to_ids("<|end|>") in sample.stop_ids
    assert sample.answer == "Hi"   # "Z" would follow if the end of turn did not stop it


def test_raw_feeds_the_plain_text(chat_folder):
    folder, tok = chat_folder
    sample = generate(str(folder), QUESTION, mode="raw", max_new_tokens=4)
    assert not sample.chat
    assert sample.prompt_ids == tok(QUESTION, add_special_tokens=False)["input_ids"]
    assert sample.answer == "ZZZZ"


def test_system_prompt_is_a_turn_of_the_template(chat_folder):
    folder, _ = chat_folder
    sample = generate(str(folder), QUESTION, system="Answer briefly.", max_new_tokens=8)
    assert sample.prompt_text == f"<|system|>Answer briefly.<|end|><|user|>{QUESTION}<|end|><|assistant|>"
    assert sample.answer == "Hi"
    with pytest.raises(ValueError, match="--system is a turn of the chat template"):
        generate(str(folder), QUESTION, system="Answer briefly.", mode="raw")


def test_prompt_dash_reads_stdin(chat_folder, monkeypatch, capsys):
    folder, _ = chat_folder
    monkeypatch.setattr("sys.stdin", io.StringIO(QUESTION + "\n"))
    assert main(["generate", "--model", str(folder), "--prompt", "-", "--show-prompt", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr()
    assert out.out == "Hi\n"
    assert f"<|user|>{QUESTION}<|end|><|assistant|>" in out.err
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert main(["generate", "--model", str(folder), "--prompt", "-"]) == 2
    assert "the prompt is empty" in capsys.readouterr().err


def _export(tmp_path, folder, fmt: str):
    from fedswarm.run_config import RunConfig
    from fedswarm.coordinator.store import Store
    from fedswarm.app.export import export
    from fedswarm.models import build_model, trainable_state

    store = Store(tmp_path / f"state-{fmt}")
    store.set_meta("run_config", RunConfig(model=str(folder), data_format=fmt).to_json())
    store.commit_round({"round": 1, "eval_loss": 1.0, "clients": []}, dict(trainable_state(build_model(str(folder)))))
    store.close()
    return export(str(tmp_path / f"state-{fmt}"), str(tmp_path / f"out-{fmt}"))


def test_exported_chat_run_answers_through_the_template_with_no_flag(tmp_path, chat_folder):
    folder, _ = chat_folder
    summary = _export(tmp_path, folder, "chat")
    assert summary["format"] == "chat"
    assert json.loads((tmp_path / "out-chat" / "fedswarm.json").read_text())["format"] == "chat"
    sample = generate(summary["out"], QUESTION, max_new_tokens=8)
    assert sample.chat and sample.answer == "Hi"
    # a folder tuned on plain text continues plain text, though its tokenizer has a template; --chat asks
    text = _export(tmp_path, folder, "text")
    assert not generate(text["out"], QUESTION, max_new_tokens=2).chat
    assert generate(text["out"], QUESTION, mode="chat", max_new_tokens=8).answer == "Hi"


def test_byte_tokenizer_presets_continue_text(tmp_path):
    assert choose_mode(str(tmp_path), byte_hf_tokenizer()) == "raw"
    with pytest.raises(ValueError, match="has no chat template"):
        choose_mode(str(tmp_path), byte_hf_tokenizer(), "chat")
