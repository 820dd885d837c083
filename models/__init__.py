"""Model loaders, their I/O, calibration text and images (``rewriter.models``).

``load_model(spec)`` returns a ``Loaded``: the model (eval, fp32), its kind, tokenizer,
``max_length`` and ``example_inputs(batch, seq_len)``; it is the engine's ``rewriter.io.ModelIO``
(main output, real tokens, labels, mask inputs, dynamic dims). ``make_calibration(loaded)``
builds the calibration, validation and held-out batches; ``calibration_from`` also takes a user's
strings or batches. A bare module's kind and inputs come from its signature and config
(``signature.py``); a SentenceTransformer goes in and comes out through ``sentence.py``. See
``zoo.py`` for the accepted specs,
``calibration.py`` for the sources and ``text.py`` for the bundled text and its fixed held-out split.
"""
from .calibration import (calibration_from, evaluation_batches, judged_lengths, make_calibration,
                          padding_tokenizer)
from .images import digit_indices, digits_pixel_values
from .sentence import OptimizedEncoder, is_sentence_transformer, sentence_loaded, sentence_result
from .signature import bind_batch, config_inputs, infer_kind
from .text import (HELDOUT_EVERY, TextSource, bundled_paragraphs, bundled_sentences,
                   bundled_text, decontaminate, load_source, pydoc_paragraphs, read_text_file,
                   split_heldout)
from .zoo import (ATTN_IMPLEMENTATIONS, Loaded, atomic_dir, load_model, main_output, minilm_path,
                  minilm_tokenizer, registered, smollm2_cache_dir, smollm2_gguf, token_chunks,
                  wrap_module)

__all__ = ["Loaded", "load_model", "wrap_module", "registered", "main_output", "make_calibration",
           "bundled_text", "bundled_sentences", "bundled_paragraphs", "pydoc_paragraphs", "read_text_file",
           "load_source", "split_heldout", "decontaminate", "TextSource", "HELDOUT_EVERY", "token_chunks",
           "digit_indices", "digits_pixel_values", "minilm_path", "minilm_tokenizer", "smollm2_gguf",
           "smollm2_cache_dir", "atomic_dir", "ATTN_IMPLEMENTATIONS", "calibration_from", "padding_tokenizer", "judged_lengths",
           "evaluation_batches", "infer_kind", "config_inputs", "bind_batch", "is_sentence_transformer",
           "sentence_loaded", "sentence_result", "OptimizedEncoder"]
