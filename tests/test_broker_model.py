"""The broker core against a dict model (Hypothesis RuleBasedStateMachine), without sockets."""

from __future__ import annotations

import types

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import vmqapi
from vmqapi import Puback, Pubcomp, Publish, Pubrec, Pubrel

LISTENER = types.SimpleNamespace(mountpoint="", allowed_versions=(3, 4), allow_anonymous_override=False)
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
        self.model = {}  # client id -> {"clean", "subs": {filter: qos}, "pending": [(topic, payload, qos)]}
        self.received = {}  # client id -> [(topic, payload, qos)] since the last check
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
                    packet, pos = vmqapi.decode_packet(data, pos)
                    if isinstance(packet, Publish):
                        self.received.setdefault(cid, []).append((packet.topic, packet.payload, packet.qos))
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

    # -- rules ----------------------------------------------------------------------
    @rule(cid=CLIENT_IDS, clean=st.booleans())
    def connect(self, cid, clean):
        if cid in self.clients:
            old_client, old_link = self.clients.pop(cid)
        else:
            old_client = None
        link = FakeLink()
        client = self.broker.connection_made(link)
        self.broker.handle(client, vmqapi.Connect(cid, clean_session=clean))
        connack, _ = vmqapi.decode_packet(link.data)
        link.data = link.data[4:]
        if old_client is not None:
            self.broker.connection_lost(old_client)  # the takeover closed its link
        previous = self.model.get(cid)
        assert connack.session_present == (previous is not None and not clean and not previous["clean"])
        if clean or previous is None or previous["clean"]:
            self.model[cid] = {"clean": clean, "subs": {}, "pending": []}
        else:
            self.model[cid]["clean"] = clean
        self.clients[cid] = (client, link)
        self.expected.setdefault(cid, []).extend(self.model[cid]["pending"])
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
    @rule(data=st.data(), topic_filter=FILTERS, qos=st.integers(0, 2))
    def subscribe(self, data, topic_filter, qos):
        cid = data.draw(st.sampled_from(sorted(self.clients)))
        self.broker.handle(self.clients[cid][0], vmqapi.Subscribe(1, ((topic_filter, qos),)))
        self.model[cid]["subs"][topic_filter] = qos
        for topic, (payload, msg_qos) in sorted(self.retained.items()):  # retained come by topic
            if vmqapi.topic_matches(topic_filter, topic):
                self.expected.setdefault(cid, []).append((topic, payload, min(qos, msg_qos)))
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
            matching = [q for f, q in state["subs"].items() if vmqapi.topic_matches(f, topic)]
            if not matching:
                continue
            delivery = (topic, payload, min(qos, max(matching)))
            if other in self.clients:
                self.expected.setdefault(other, []).append(delivery)
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
            assert self.broker.sessions[("", cid)].subs == state["subs"]


TestBrokerModel = BrokerModel.TestCase
TestBrokerModel.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
