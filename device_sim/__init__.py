"""Simulated constrained devices that speak real CoAP over UDP to a gateway.

`device_sim.models` holds the pure device physics; `device_sim.coap` a small CoAP message
layer (confirmable retransmission, deduplication, observe) that stays cheap enough to run
thousands of devices in one process; `device_sim.node` one device; `device_sim.fleet` many.
"""
