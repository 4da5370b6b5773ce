"""The broker core against a dict model (Hypothesis RuleBasedStateMachine), without sockets.

Clients speak MQTT 3.1.1 or 5; MQTT 5 adds session expiry (0 or long), No Local,
Retain As Published, Retain Handling and subscription identifiers to the model.
"""

from __future__ import annotations

import types

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import vmqapi
from vmqapi import Puback, Pubcomp, Publish, Pubrec, Pubrel

LISTENER = types.SimpleNamespace(mountpoint="", allowed_versions=(3, 4, 5), allow_anonymous_override=False)
CLIENT_IDS = st.sampled_from(["c1", "c2", "c3"])
FILTERS = st.sampled_from(["a", "a/#", "+", "#", "+/b", "a/b"])
TOPICS = st.sampled_from(["a", "a/b", "b", "b/b"])


class FakeLink:
    """What MqttLink offers the broker, recording bytes instead of sending them."""

    def __init__(self):
        self.listener, self.peer, self.writable = LISTENER, ("127.0.0.1", 1), True
        self.data, self.closed = b"", False

    def write(self, data):
        if not self.closed:
            self.data += data

    def close(self):
        self.closed = True


class BrokerModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.broker = vmqapi.Broker(lambda: vmqapi.Config({}), vmqapi.MemoryStore(), clock=lambda: 1000.0)
        self.clients = {}  # client id -> (Client, FakeLink) while connected
        self.versions = {}  # client id -> protocol level of its connection
        # client id -> {"clean": ends with its connection, "subs": {filter: (qos, no_local, rap, sub_id)},
        #               "pending": [delivery]}; a delivery is (topic, payload, qos, rap retain, ids, retained)
        self.model = {}
        self.received = {}  # client id -> [(topic, payload, qos, retain, ids)] since the last check
        self.expected = {}
        self.retained = {}
        self.counter = 0

    # -- plumbing -------------------------------------------------------------------
    def pump(self):
        """Decode what the broker wrote; acknowledge publishes as a well-behaved client."""
        busy = True
        while busy:
            busy = False
            for cid, (client, link) in list(self.clients.items()):
                data, link.data = link.data, b""
                pos = 0
                while pos < len(data):
                    packet, pos = vmqapi.decode_packet(data, pos, 0, self.versions[cid])
                    if isinstance(packet, Publish):
                        ids = tuple(sorted(v for n, v in packet.properties if n == "subscription_identifier"))
                        self.received.setdefault(cid, []).append((packet.topic, packet.payload, packet.qos,
                                                                  packet.retain, ids))
                        if packet.qos == 1:
                            self.broker.handle(client, Puback(packet.packet_id))
                        elif packet.qos == 2:
                            self.broker.handle(client, Pubrec(packet.packet_id))
                        busy = True
                    elif isinstance(packet, Pubrel):
                        self.broker.handle(client, Pubcomp(packet.packet_id))
                        busy = True

    def drop_connection(self, cid):
        client, link = self.clients.pop(cid)
        self.broker.connection_lost(client)

    def go_offline(self, cid):
        if self.model[cid]["clean"]:
            del self.model[cid]

    def expect(self, cid, deliveries):
        """What ``cid``'s connection should see of ``deliveries``: MQTT 3.1.1 has no ids, no RAP retain flag."""
        v5 = self.versions[cid] == 5
        self.expected.setdefault(cid, []).extend(
            (topic, payload, qos, retained or (v5 and rap), ids if v5 else ())
            for topic, payload, qos, rap, ids, retained in deliveries)

    # -- rules ----------------------------------------------------------------------
    @rule(cid=CLIENT_IDS, clean=st.booleans(), version=st.sampled_from([4, 5]), expiry=st.sampled_from([0, 100]))
    def connect(self, cid, clean, version, expiry):
        if cid in self.clients:
            old_client, old_link = self.clients.pop(cid)
        else:
            old_client = None
        link = FakeLink()
        client = self.broker.connection_made(link)
        props = (("session_expiry_interval", expiry),) if version == 5 and expiry else ()
        self.broker.handle(client, vmqapi.Connect(cid, version, clean, properties=props))
        connack, used = vmqapi.decode_packet(link.data, 0, 0, version)
        assert connack.return_code == 0
        link.data = link.data[used:]
        if old_client is not None:
            self.broker.connection_lost(old_client)  # the takeover closed its link
        ephemeral = clean if version == 4 else expiry == 0  # MQTT 5: Clean Start and the expiry are apart
        previous = self.model.get(cid)
        assert connack.session_present == (previous is not None and not clean and not previous["clean"])
        if clean or previous is None or previous["clean"]:
            self.model[cid] = {"clean": ephemeral, "subs": {}, "pending": []}
        else:
            self.model[cid]["clean"] = ephemeral
        self.clients[cid] = (client, link)
        self.versions[cid] = version
        self.expect(cid, self.model[cid]["pending"])
        self.model[cid]["pending"] = []
        self.pump()

    @precondition(lambda self: self.clients)
    @rule(data=st.data(), graceful=st.booleans())
    def leave(self, data, graceful):
        cid = data.draw(st.sampled_from(sorted(self.clients)))
        if graceful:
            client, _ = self.clients[cid]
            self.broker.handle(client, vmqapi.Disconnect())
        self.drop_connection(cid)
        self.go_offline(cid)

    @precondition(lambda self: self.clients)
    @rule(data=st.data(), topic_filter=FILTERS, qos=st.integers(0, 2), no_local=st.booleans(), rap=st.booleans(),
          handling=st.integers(0, 2), sub_id=st.sampled_from([0, 1, 300]))
    def subscribe(self, data, topic_filter, qos, no_local, rap, handling, sub_id):
        cid = data.draw(st.sampled_from(sorted(self.clients)))
        if self.versions[cid] == 4:
            no_local = rap = False
            handling = sub_id = 0
        options = qos | no_local << 2 | rap << 3 | handling << 4
        props = (("subscription_identifier", sub_id),) if sub_id else ()
        self.broker.handle(self.clients[cid][0], vmqapi.Subscribe(1, ((topic_filter, options),), props))
        existed = topic_filter in self.model[cid]["subs"]
        self.model[cid]["subs"][topic_filter] = (qos, no_local, rap, sub_id)
        if handling == 0 or (handling == 1 and not existed):
            self.expect(cid, [(topic, payload, min(qos, msg_qos), False, (sub_id,) if sub_id else (), True)
                              for topic, (payload, msg_qos) in sorted(self.retained.items())  # by topic
                              if vmqapi.topic_matches(topic_filter, topic)])
        self.pump()

    @precondition(lambda self: self.clients)
    @rule(data=st.data(), topic_filter=FILTERS)
    def unsubscribe(self, data, topic_filter):
        cid = data.draw(st.sampled_from(sorted(self.clients)))
        self.broker.handle(self.clients[cid][0], vmqapi.Unsubscribe(2, (topic_filter,)))
        self.model[cid]["subs"].pop(topic_filter, None)
        self.pump()

    @precondition(lambda self: self.clients)
    @rule(data=st.data(), topic=TOPICS, qos=st.integers(0, 2), retain=st.booleans())
    def publish(self, data, topic, qos, retain):
        cid = data.draw(st.sampled_from(sorted(self.clients)))
        self.counter += 1
        payload = str(self.counter).encode()
        self.broker.handle(self.clients[cid][0], Publish(topic, payload, qos, retain, False, 7 if qos else None))
        if qos == 2:
            self.broker.handle(self.clients[cid][0], Pubrel(7))
        if retain:
            self.retained[topic] = (payload, qos)
        for other, state in self.model.items():
            matching = [sub for f, sub in state["subs"].items()
                        if vmqapi.topic_matches(f, topic) and not (sub[1] and other == cid)]  # No Local
            if not matching:
                continue
            ids = tuple(sorted(sub[3] for sub in matching if sub[3]))
            delivery = (topic, payload, min(qos, max(sub[0] for sub in matching)),
                        retain and any(sub[2] for sub in matching), ids, False)
            if other in self.clients:
                self.expect(other, [delivery])
            else:
                state["pending"].append(delivery)
        self.pump()

    # -- invariants -------------------------------------------------------------------
    @invariant()
    def deliveries_equal_the_models_matches(self):
        for cid in set(self.expected) | set(self.received):
            assert self.received.get(cid, []) == self.expected.get(cid, []), cid
        self.received.clear()
        self.expected.clear()

    @invariant()
    def sessions_agree(self):
        assert {cid for (_, cid) in self.broker.sessions} == set(self.model)
        for cid, state in self.model.items():
            assert self.broker.sessions[("", cid)].subs == {
                f: qos | no_local << 2 | rap << 3 | sub_id << 8 for f, (qos, no_local, rap, sub_id) in
                state["subs"].items()}


TestBrokerModel = BrokerModel.TestCase
TestBrokerModel.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
