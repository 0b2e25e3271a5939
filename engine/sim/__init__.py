"""``refloop simulate``: the real engine in virtual time against a synthetic network.

:mod:`engine.sim.network` draws the patients, specialists and orders and holds the
behaviour parameters; :mod:`engine.sim.messages` builds the HL7 v2 messages they send;
:mod:`engine.sim.run` drives one run (ingest, normaliser, scheduler, outbox with
scripted peers) and :mod:`engine.sim.compare` runs a network with a policy and without
its nudges, for the KPIs side by side.
"""
