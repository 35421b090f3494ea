"""A chatbot frontend built only from proto/: no kaizen import anywhere.

Usage: python independent_client.py STUBS_DIR HOST:PORT TIMEOUT_S
The API key is read from the environment variable KAIZEN_API_KEY and sent on every call
as `authorization: Bearer <key>` metadata.
Chats, sends thumbs up on every answer, waits for the served version to change, chats
again, and prints one JSON object with what it saw.
"""

import json
import os
import sys
import time
import uuid

sys.path.insert(0, sys.argv[1])

import chat_pb2  # noqa: E402
import chat_pb2_grpc  # noqa: E402
import feedback_pb2  # noqa: E402
import feedback_pb2_grpc  # noqa: E402
import grpc  # noqa: E402
import model_pb2  # noqa: E402
import model_pb2_grpc  # noqa: E402

assert "kaizen" not in sys.modules

target, timeout_s = sys.argv[2], float(sys.argv[3])
AUTH = (("authorization", f"Bearer {os.environ['KAIZEN_API_KEY']}"),)
channel = grpc.insecure_channel(target)
grpc.channel_ready_future(channel).result(timeout=30)
chat = chat_pb2_grpc.ChatServiceStub(channel)
feedback = feedback_pb2_grpc.FeedbackServiceStub(channel)
model = model_pb2_grpc.ModelServiceStub(channel)


def ask(i):
    return chat.Generate(
        chat_pb2.GenerateRequest(
            messages=[chat_pb2.Message(role="user", content=f"Tell me a fact, number {i}.")],
            sampling=chat_pb2.SamplingParams(max_new_tokens=8, temperature=0.9, seed=i + 1),
            user_id=f"user-{i % 3}",
            request_id=f"req-{i}",
        ),
        metadata=AUTH,
    )


seen = {"before": [], "acks": [], "after": None, "versions": []}
deadline = time.monotonic() + timeout_s
i = 0
while time.monotonic() < deadline:
    reply = ask(i)
    seen["before"].append(reply.model_version)
    ack = feedback.SubmitFeedback(
        feedback_pb2.Feedback(
            event_id=str(uuid.uuid4()),
            response_id=reply.response_id,
            user_id=f"user-{i % 3}",
            thumb=feedback_pb2.THUMB_UP if i % 2 else feedback_pb2.THUMB_DOWN,
        ),
        metadata=AUTH,
    )
    seen["acks"].append(ack.accepted)
    i += 1
    info = model.GetModelInfo(model_pb2.GetModelInfoRequest(), metadata=AUTH)
    served = info.versions[0].version
    seen["versions"].append(served)
    if served != "v0":
        seen["after"] = ask(1000).model_version
        break
    time.sleep(0.2)
print(json.dumps(seen))
