"""Recipe bodies shared by backbones (ViLT, METER): train + evaluate for classifier VQA
(:mod:`.vqa`), NLVR2 (:mod:`.nlvr`), retrieval with sampled negatives (:mod:`.retrieval`) and
MLM + ITM pre-training (:mod:`.pretrain`). An ``examples/<family>/<recipe>.py`` entry point passes
its builder and default config to ``run_*``; the engine (``start_recipe``, ``prepare_model``,
``train_and_reload_best``, ``save_results``) does the rest, so no loop is copied.

The contract a backbone's task models meet (the batch keys of
:mod:`torchmm_ext.data.vl_tasks`' collators are their ``forward`` arguments):

* every builder takes ``vocab_size`` and ``pad_token_id`` (the VQA builder also ``num_answers``);
* VQA: ``model(images, input_ids, attention_mask, pixel_mask=None, targets=None)`` ->
  ``.logits [B, A]``, ``.loss`` (soft-target BCE) when ``targets`` is given;
* NLVR2: ``model(images [B, 2, 3, H, W], input_ids, attention_mask, pixel_mask=None,
  labels=None)`` -> ``.logits [B, 2]``, ``.loss``;
* retrieval: ``model(images, input_ids [B, T, L], attention_mask, pixel_mask=None)`` ->
  ``.scores [B, T]``, ``.loss`` (the first text of each row is the positive), and for
  evaluation ``model.embed_images(images, pixel_mask)`` -> an encoding whose fields are
  ``[B, ...]`` tensors, ``model.score_pairs(encoding, input_ids, attention_mask) -> [N]``;
* pre-training: ``model(images, input_ids, attention_mask, mlm_input_ids, mlm_labels,
  itm_images, itm_labels, pixel_mask=None, itm_pixel_mask=None)`` -> ``.loss``, ``.itm_loss``,
  ``.mlm_loss``, ``.itm_logits``, ``.mlm_logits``.
"""
