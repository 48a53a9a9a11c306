"""Running softmux as Ray Serve deployments (`softmux serve-ray`, `deploy/ray/serve.yaml`).

`wire` holds the pieces without Ray (HTTP messages between the ingress and the replicas, the
Prometheus merge); `options` the `serve-ray` flags (no Ray either); `control` the per-app control
actor (store changes, replica roster, fan-out); `router` the task-affine request router; `replica`
the engine replica deployment (`SoftmuxEngine`); `ingress` the HTTP ingress deployment
(`SoftmuxIngress`); `ray_app` the app builder and `softmux serve-ray`. All but `wire` and `options`
import Ray (`pip install 'softmux[ray]'`).
"""
