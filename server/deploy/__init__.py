"""Running softmux as Ray Serve deployments (`softmux serve-ray`, `deploy/ray/serve.yaml`).

`wire` holds the pieces without Ray (HTTP messages between the ingress and the replicas, the
Prometheus merge); `control` the per-app control actor (store changes, replica roster, fan-out);
`ray_app` the deployments and the app builder. Only `control` and `ray_app` import Ray
(`pip install 'softmux[ray]'`).
"""
