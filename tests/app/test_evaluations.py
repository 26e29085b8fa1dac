"""A run's evaluations: the corpus options a datastore was built with reach its evaluation."""

from knnlm_jax.evaluations import with_datastore_options


def test_a_tfds_datastores_text_feature_is_what_its_dataset_is_evaluated_with():
    manifest = dict(corpus="tfds:wiki_articles_test/small:train",
                    corpus_options=dict(text_feature="content", tfds_data_dir="/data/tfds"))
    notes = []
    same = with_datastore_options(manifest, "tfds:wiki_articles_test/small", {}, notes.append)
    assert same == dict(text_feature="content", tfds_data_dir="/data/tfds") and not notes
    given = with_datastore_options(manifest, "tfds:wiki_articles_test/small:test", dict(text_feature="text"),
                                   notes.append)
    assert given["text_feature"] == "text" and given["tfds_data_dir"] == "/data/tfds"
    assert len(notes) == 1 and "'text'" in notes[0] and "'content'" in notes[0]  # said, not silent
    assert with_datastore_options(manifest, "tfds:other_dataset", {}, notes.append) == {}
    assert with_datastore_options(manifest, "/path/to/wikitext", {}, notes.append) == {}
    wiki3b = dict(corpus="wiki3b", corpus_options=dict(text_feature="text", tfds_data_dir="/big"))
    assert with_datastore_options(wiki3b, "tfds:wikipedia/20230601.en:train", {}, notes.append)["tfds_data_dir"] == "/big"
