-- Argo CD health check for kubetune.io/FineTuneJob (resource.customizations.health.kubetune.io_FineTuneJob).
-- Applied by examples/gitops/argocd-cm.yaml; tested by tests/docs/test_gitops.py.
-- Training is Progressing while it waits, starts or runs; Healthy when it succeeded; Degraded when it
-- failed or its spec was rejected; Suspended when suspended (by runPolicy.suspend).
local hs = {}
local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to pick the job up"
  return hs
end

local function condition(kind)
  if status.conditions ~= nil then
    for _, c in ipairs(status.conditions) do
      if c.type == kind and c.status == "True" then
        return c
      end
    end
  end
  return nil
end

local rejected = condition("SpecRejected")
if rejected ~= nil then
  hs.status = "Degraded"
  hs.message = "Spec rejected: " .. (rejected.message or rejected.reason or "see the job's events")
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end

local phase = status.phase
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "Training succeeded"
  local done = condition("Succeeded")
  if done ~= nil and done.message ~= nil then
    hs.message = done.message
  end
elseif phase == "Failed" then
  hs.status = "Degraded"
  local failed = condition("Failed")
  hs.message = "Training failed"
  if failed ~= nil then
    hs.message = "Training failed: " .. (failed.message or failed.reason or "see the job's events")
  end
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = "Suspended (spec.runPolicy.suspend)"
elseif phase == "Running" then
  hs.status = "Progressing"
  hs.message = "Training"
  local progress = status.progress
  if progress ~= nil and progress.percent ~= nil then
    hs.message = string.format("Training: %.0f%%", progress.percent)
    if progress.step ~= nil and progress.totalSteps ~= nil then
      hs.message = hs.message .. string.format(" (step %d of %d)", progress.step, progress.totalSteps)
    end
  end
else
  -- Pending (also while Kueue has not admitted the job) and Initializing
  hs.status = "Progressing"
  hs.message = phase
  local latest = nil
  if status.conditions ~= nil then
    for _, c in ipairs(status.conditions) do
      if c.status == "True" and c.message ~= nil then
        latest = c
      end
    end
  end
  if latest ~= nil then
    hs.message = phase .. ": " .. latest.message
  end
end
return hs
