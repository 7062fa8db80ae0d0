# Container images: `make -f infra/images.mk images` (from the repository root).
# The tag is the project version; the manifests in infra/ refer to these names.
IMAGE ?= storymem
VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
REGISTRY ?=

.PHONY: images image image-hps push

images: image image-hps

image:
	DOCKER_BUILDKIT=1 docker build -f infra/Dockerfile -t $(IMAGE):$(VERSION) .

image-hps: image
	DOCKER_BUILDKIT=1 docker build -f infra/Dockerfile.hps \
		--build-arg BASE_IMAGE=$(IMAGE):$(VERSION) -t $(IMAGE)-hps:$(VERSION) .

push: images
	test -n "$(REGISTRY)" || { echo "set REGISTRY=registry.example.com/team"; exit 2; }
	for name in $(IMAGE) $(IMAGE)-hps; do \
		docker tag $$name:$(VERSION) $(REGISTRY)/$$name:$(VERSION) && \
		docker push $(REGISTRY)/$$name:$(VERSION); done
