"""The `asr` task's vocabulary, processor and model: a fresh small conformer on log-mel features,
or the user's base (safetensors only, no remote code) with its output layer resized to the merged
vocabulary.

The fresh model is built for little data: a waveform front end (wav2vec2's convolutions) must
learn its filters from the clips, log-mel features bring them for free (and are normalised per
utterance and mel bin, so loudness and microphones matter less); conformer layers (Gulati et al.,
2020: convolution for local patterns, self-attention for context) are what small-footprint
recognisers use. transformers' `Wav2Vec2BertForCTC` is exactly that model (its feature extractor
computes 80 log-mels per 10 ms, `frame_stack` frames stacked: one output per 40 ms), so the artifact
loads with `transformers.pipeline("automatic-speech-recognition")` and nothing of ours."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer_core.errors import TrainerError
from trainer_core.model_dir import SAFE_LOAD, check_model_dir

from . import SAMPLE_RATE
from .asr_args import ASRArguments
from .vocab import BOS, DELIMITER, EOS, PAD, UNK, base_is_uppercase, characters, fresh_vocab, merge_vocab, normalise, write_vocab


N_MELS = 80  # transformers' config takes 2 * N_MELS * frame_stack as the samples per output frame: 80 makes it true


@dataclass
class Built:
    model: object
    processor: object
    uppercase: bool
    added_chars: list[str]
    base_info: dict | None  # model_type, vocab size, lineage of the base
    notes: list[str]


def build_model(base_dir: Path | None, train_texts_raw: list[str], args: ASRArguments, work: Path) -> Built:
    import torch
    from transformers import (
        AutoFeatureExtractor,
        AutoModelForCTC,
        SeamlessM4TFeatureExtractor,
        Wav2Vec2BertConfig,
        Wav2Vec2BertForCTC,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
    )

    notes: list[str] = []
    if base_dir is None:
        texts = [normalise(t, args.chars_to_ignore) for t in train_texts_raw]
        vocab = fresh_vocab(characters(texts))
        tokenizer = Wav2Vec2CTCTokenizer(str(write_vocab(vocab, work)), unk_token=UNK, pad_token=PAD, bos_token=BOS,
                                         eos_token=EOS, word_delimiter_token=DELIMITER)
        extractor = SeamlessM4TFeatureExtractor(feature_size=N_MELS, num_mel_bins=N_MELS, sampling_rate=SAMPLE_RATE,
                                                stride=args.frame_stack, padding_value=1.0)
        config = Wav2Vec2BertConfig(
            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
            feature_projection_input_dim=N_MELS * args.frame_stack,
            hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
            num_attention_heads=args.num_attention_heads, intermediate_size=args.intermediate_size,
            conv_depthwise_kernel_size=args.conv_kernel, position_embeddings_type="rotary",
            hidden_dropout=args.dropout, attention_dropout=args.dropout, activation_dropout=args.dropout,
            feat_proj_dropout=args.dropout, final_dropout=args.dropout, conformer_conv_dropout=args.dropout,
            layerdrop=0.0, add_adapter=False,
            mask_time_prob=0.0, mask_feature_prob=0.0,  # SpecAugment is done on the log-mels (ctc.py)
            ctc_loss_reduction="mean", ctc_zero_infinity=True,
        )
        model = Wav2Vec2BertForCTC(config)
        return Built(model, processor_of(extractor, tokenizer), False, [], None, notes)

    # A base model: only data is read (config, safetensors, processor files).
    config_json = check_model_dir(base_dir)
    try:
        base_tokenizer = Wav2Vec2CTCTokenizer.from_pretrained(str(base_dir), **SAFE_LOAD)
    except (OSError, ValueError, TypeError):
        base_tokenizer = None  # a pretrained encoder without a CTC head: the vocabulary starts afresh
    if base_tokenizer is not None:
        base_vocab = base_tokenizer.get_vocab()
        uppercase = base_is_uppercase(base_vocab)
        delimiter = base_tokenizer.word_delimiter_token or DELIMITER
        unk, pad = base_tokenizer.unk_token or UNK, base_tokenizer.pad_token or PAD
        bos, eos = base_tokenizer.bos_token, base_tokenizer.eos_token
    else:
        notes.append("the base has no tokenizer (vocab.json): its output layer is replaced by a new one")
        base_vocab, uppercase, delimiter, unk, pad, bos, eos = {}, False, DELIMITER, UNK, PAD, BOS, EOS
    if uppercase:
        notes.append("the base model spells in capitals: transcripts are upper-cased to use its trained outputs")

    texts = [normalise(t, args.chars_to_ignore, uppercase) for t in train_texts_raw]
    chars = characters(texts)
    head_size = int(config_json.get("vocab_size", 0)) if base_tokenizer is not None else 0
    if base_vocab:
        vocab, added = merge_vocab(base_vocab, chars, delimiter, head_size)
    else:
        vocab, added = fresh_vocab(chars), []
    # Added tokens of the base tokenizer are already in get_vocab(); vocab.json gets them all.
    tokenizer = Wav2Vec2CTCTokenizer(str(write_vocab(vocab, work)), unk_token=unk, pad_token=pad, bos_token=bos,
                                     eos_token=eos, word_delimiter_token=delimiter)
    if (base_dir / "preprocessor_config.json").is_file():
        # Data only: the extractor's class comes from a fixed table of transformers' own.
        try:
            extractor = AutoFeatureExtractor.from_pretrained(str(base_dir), **SAFE_LOAD)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TrainerError(f"The base model's preprocessor_config.json cannot be read as a feature extractor: "
                               f"{str(e).splitlines()[0][:300]}") from None
    else:
        extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                                             do_normalize=True, return_attention_mask=True)
        notes.append("the base has no preprocessor_config.json: a standard wav2vec2 feature extractor is used")
    if extractor.sampling_rate != SAMPLE_RATE:
        raise TrainerError(f"The base model's feature extractor expects {extractor.sampling_rate} Hz audio; only "
                           f"{SAMPLE_RATE} Hz models are supported.")
    try:
        model = AutoModelForCTC.from_pretrained(
            str(base_dir), use_safetensors=True, ctc_loss_reduction="mean", ctc_zero_infinity=True,
            pad_token_id=tokenizer.pad_token_id, **SAFE_LOAD,
            **({"mask_time_prob": args.mask_time_prob} if "mask_time_prob" in args.given else {}),
        )
    except (ValueError, OSError, KeyError) as e:
        raise TrainerError(f"The base model ({config_json.get('model_type')}) cannot be loaded as a CTC speech model: "
                           f"{str(e).splitlines()[0][:300]}") from None

    # The output layer: one row per vocabulary id. Rows of the base's ids are kept; rows of new
    # characters start small and random, as a fresh head would.
    size = max(len(tokenizer), max(vocab.values()) + 1)
    old = model.lm_head
    new = torch.nn.Linear(old.in_features, size)
    with torch.no_grad():
        new.weight.normal_(0.0, model.config.initializer_range)
        new.bias.zero_()
        if base_tokenizer is not None:
            keep = min(old.out_features, size)
            new.weight[:keep] = old.weight[:keep]
            new.bias[:keep] = old.bias[:keep]
    model.lm_head = new
    model.config.vocab_size = size
    processor = processor_of(extractor, tokenizer)
    base_info = {
        "model_type": config_json.get("model_type"),
        "base_vocab_size": len(base_vocab),
        "lineage": (config_json.get("retrain") or {}).get("lineage", []),
    }
    if added:
        notes.append(f"characters added to the base vocabulary: {''.join(added)!r}")
    return Built(model, processor, uppercase, added, base_info, notes)


def processor_of(extractor, tokenizer):
    """The processor class that pairs this feature extractor with a CTC tokenizer."""
    from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertProcessor, Wav2Vec2Processor

    if isinstance(extractor, SeamlessM4TFeatureExtractor):
        return Wav2Vec2BertProcessor(feature_extractor=extractor, tokenizer=tokenizer)
    return Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)
