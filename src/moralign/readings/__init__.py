"""Readings of a model's distribution over the answers of an item, beyond the next-token ``logprob`` reading.

* ``sample`` (:mod:`.sample`): N seeded completions of the item's prompt at temperature 1, each parsed for its
  answer (:mod:`.parse`); p = counts / valid draws.
* ``verbal`` (:mod:`.verbal`): the model states the community's shares as a JSON object, K draws under a
  JSON-schema constraint; p = the mean of the draws, each divided by its sum.
* The sampling floor (:mod:`.floor`): the expected total variation of N draws from the human distribution.

Raw completions are cached by the full request (:mod:`.cache`) and re-parsed by versioned parsers. See
docs/readings.md.
"""
