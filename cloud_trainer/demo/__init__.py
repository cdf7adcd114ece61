"""The end-to-end demo and the broker it starts: not part of the product's import path.

- :mod:`~cloud_trainer.demo.loop`         the whole loop on one machine (``cloud-train demo``)
- :mod:`~cloud_trainer.demo.localbroker`  a broker on localhost (Mosquitto, else embedded amqtt), also
  used by the tests and benchmarks

Only ``cloud-train demo`` imports this package, inside the command.
"""
