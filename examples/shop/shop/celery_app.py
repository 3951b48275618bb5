"""The shop's own Celery app: its name, its queues; Aura's settings and DLQ on top.

celery -A shop.celery_app worker -Q shop_orders,shop_mail
"""

from celery import Celery

from aura.messaging import configure

app = Celery("shop", include=["shop.tasks"])
# Settings (time limits, late acks, quorum queues with a delivery limit, JSON only,
# publisher confirms), the envelope guard and the DLQ, with the shop's queue names. The
# broker comes from CELERY_BROKER_URL unless the app already has one.
configure(app, queues=["shop_orders", "shop_mail"])
