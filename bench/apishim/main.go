// Command apishim serves the core, batch and RBAC kinds the kubetune operator uses from a
// Kubernetes API server that has no core API: apiextensions-apiserver (the half of kube-apiserver
// that serves CustomResourceDefinitions) with those kinds installed as custom resources of
// stand-in groups (bench/apishim/standins.yaml). It is a reverse proxy that rewrites paths,
// apiVersions and group names both ways, so clients see /api/v1/namespaces/N/pods, batch/v1 Jobs
// and so on, answered by Kubernetes' own generic API server code and etcd (watch cache, label
// selectors, resourceVersion conflicts, the status subresource).
//
// Why: no kube-apiserver binary can be had on the machines this project is built on
// (tests/support/build_crd_server.sh says what was looked at); bench/operator_scale.py's numbers
// are meant to come from a real API server. See bench/README.md, "On Kubernetes' API server code".
//
// Namespaces are served by the shim from memory (create, get, list, delete, an idle watch):
// apiextensions-apiserver stores namespaced custom resources in any namespace (NamespaceLifecycle
// admission is off there), and a cluster-scoped stand-in named "namespaces" would collide with the
// /namespaces/NAME/ paths of the namespaced ones.
//
//	apishim -listen 127.0.0.1:PORT -upstream https://127.0.0.1:PORT -ca ca.crt -cert admin.crt -key admin.key
//
// Standard library only: tests/support/build_crd_server.sh's Go builds it in GOPATH mode.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net/http"
	"os"
	"regexp"
	"strings"
	"sync"
	"time"
)

// The real group (as clients spell it in paths) and its stand-in, served by the CRD server.
var groups = []struct{ real, standin string }{
	{"", "core.shim.kubetune.io"},
	{"batch", "batch.shim.kubetune.io"},
	{"rbac.authorization.k8s.io", "rbac.shim.kubetune.io"},
}

// Answers: stand-in names back to the real ones (apiVersion "core.shim.kubetune.io/v1" -> "v1",
// messages such as `configmaps.core.shim.kubetune.io "x" already exists` -> `configmaps "x" ...`,
// apiserver_request_total's group="batch.shim.kubetune.io" -> group="batch").
var toReal = strings.NewReplacer(
	"core.shim.kubetune.io/v1", "v1",
	".core.shim.kubetune.io", "",
	"core.shim.kubetune.io", "",
	"batch.shim.kubetune.io", "batch",
	"rbac.shim.kubetune.io", "rbac.authorization.k8s.io",
)

// Requests: the apiVersion of an object sent to a stand-in path.
var apiVersionField = regexp.MustCompile(`"apiVersion"\s*:\s*"(v1|batch/v1|rbac\.authorization\.k8s\.io/v1)"`)

func toStandin(body []byte) []byte {
	return apiVersionField.ReplaceAllFunc(body, func(m []byte) []byte {
		sub := apiVersionField.FindSubmatch(m)
		version := string(sub[1])
		switch version {
		case "v1":
			return []byte(`"apiVersion":"core.shim.kubetune.io/v1"`)
		case "batch/v1":
			return []byte(`"apiVersion":"batch.shim.kubetune.io/v1"`)
		default:
			return []byte(`"apiVersion":"rbac.shim.kubetune.io/v1"`)
		}
	})
}

// rewritePath maps a client's path to the CRD server's; ok is false for paths left as they are.
func rewritePath(path string) (string, bool) {
	if path == "/api/v1" || strings.HasPrefix(path, "/api/v1/") {
		return "/apis/core.shim.kubetune.io/v1" + strings.TrimPrefix(path, "/api/v1"), true
	}
	for _, g := range groups[1:] {
		prefix := "/apis/" + g.real
		if path == prefix || strings.HasPrefix(path, prefix+"/") {
			return "/apis/" + g.standin + strings.TrimPrefix(path, prefix), true
		}
	}
	return path, false
}

type shim struct {
	mu       sync.Mutex
	known    map[string]bool // Namespaces created through the shim
	upstream string
	client   *http.Client
	verbose  bool
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	body, _ := json.Marshal(v)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(body)
}

// namespaceObject is a Namespace as kube-apiserver answers it (Active: nothing here deletes one).
func namespaceObject(name string) map[string]any {
	return map[string]any{"kind": "Namespace", "apiVersion": "v1",
		"metadata": map[string]any{"name": name, "resourceVersion": "1", "labels": map[string]string{"kubernetes.io/metadata.name": name}},
		"spec":     map[string]any{"finalizers": []string{"kubernetes"}}, "status": map[string]any{"phase": "Active"}}
}

func notFound(w http.ResponseWriter, name string) {
	writeJSON(w, 404, map[string]any{"kind": "Status", "apiVersion": "v1", "metadata": map[string]any{}, "status": "Failure",
		"message": `namespaces "` + name + `" not found`, "reason": "NotFound", "details": map[string]any{"name": name, "kind": "namespaces"}, "code": 404})
}

// namespaces serves /api/v1/namespaces[/NAME] from memory: create, get, list, delete (the name
// only: what the namespace held stays), and a watch that stays open with nothing to say (a client
// in namespaced mode watches them for deletions).
func (s *shim) namespaces(w http.ResponseWriter, r *http.Request, name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case r.Method == http.MethodPost && name == "":
		var ns struct {
			Metadata struct {
				Name string `json:"name"`
			} `json:"metadata"`
		}
		if err := json.NewDecoder(r.Body).Decode(&ns); err != nil || ns.Metadata.Name == "" {
			writeJSON(w, 400, map[string]any{"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "a Namespace with metadata.name", "reason": "BadRequest", "code": 400})
			return
		}
		if s.known[ns.Metadata.Name] {
			writeJSON(w, 409, map[string]any{"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": `namespaces "` + ns.Metadata.Name + `" already exists`, "reason": "AlreadyExists", "code": 409})
			return
		}
		s.known[ns.Metadata.Name] = true
		writeJSON(w, 201, namespaceObject(ns.Metadata.Name))
	case r.Method == http.MethodDelete && name != "":
		if !s.known[name] {
			notFound(w, name)
			return
		}
		delete(s.known, name) // what it held stays in etcd: nothing here garbage-collects
		gone := namespaceObject(name)
		gone["status"] = map[string]any{"phase": "Terminating"}
		writeJSON(w, 200, gone)
	case r.Method != http.MethodGet:
		writeJSON(w, 405, map[string]any{"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "apishim serves only create, get, list, watch and delete of Namespaces", "reason": "MethodNotAllowed", "code": 405})
	case name != "":
		if !s.known[name] {
			notFound(w, name)
			return
		}
		writeJSON(w, 200, namespaceObject(name))
	case r.URL.Query().Get("watch") == "true" || r.URL.Query().Get("watch") == "1":
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(200)
		if flusher, ok := w.(http.Flusher); ok {
			flusher.Flush()
		}
		s.mu.Unlock()
		timeout := time.Hour
		if seconds, err := time.ParseDuration(r.URL.Query().Get("timeoutSeconds") + "s"); err == nil {
			timeout = seconds
		}
		select {
		case <-r.Context().Done():
		case <-time.After(timeout):
		}
		s.mu.Lock()
	default:
		items := []any{}
		for known := range s.known {
			items = append(items, namespaceObject(known))
		}
		writeJSON(w, 200, map[string]any{"kind": "NamespaceList", "apiVersion": "v1", "metadata": map[string]any{"resourceVersion": "1"}, "items": items})
	}
}

// namespacesResource is /api/v1's entry for Namespaces, added to the stand-ins' list.
var namespacesResource = map[string]any{"name": "namespaces", "singularName": "namespace", "namespaced": false, "kind": "Namespace",
	"verbs": []string{"create", "delete", "get", "list", "watch"}, "shortNames": []string{"ns"}}

func (s *shim) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if s.verbose {
		log.Printf("%s %s %s", r.Method, r.URL.RequestURI(), r.Header.Get("Accept"))
	}
	path := r.URL.Path
	if path == "/api" {
		writeJSON(w, 200, map[string]any{"kind": "APIVersions", "versions": []string{"v1"},
			"serverAddressByClientCIDRs": []map[string]string{{"clientCIDR": "0.0.0.0/0", "serverAddress": r.Host}}})
		return
	}
	if path == "/api/v1/namespaces" {
		s.namespaces(w, r, "")
		return
	}
	if rest, found := strings.CutPrefix(path, "/api/v1/namespaces/"); found && !strings.Contains(rest, "/") {
		s.namespaces(w, r, rest)
		return
	}
	if path == "/apis" && r.Method == http.MethodGet {
		s.groupList(w, r)
		return
	}
	target, rewritten := rewritePath(path)
	var body io.Reader = r.Body
	if rewritten && (r.Method == http.MethodPost || r.Method == http.MethodPut) {
		raw, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), 400)
			return
		}
		if r.Method == http.MethodPost && strings.HasSuffix(path, "/events") {
			raw = nameEvent(raw)
		}
		body = bytes.NewReader(toStandin(raw))
	}
	url := s.upstream + target
	if r.URL.RawQuery != "" {
		url += "?" + r.URL.RawQuery
	}
	out, err := http.NewRequestWithContext(r.Context(), r.Method, url, body)
	if err != nil {
		http.Error(w, err.Error(), 500)
		return
	}
	for key, values := range r.Header {
		if key == "Accept-Encoding" || key == "Connection" || key == "Authorization" {
			continue // the transport asks for gzip itself and undoes it; credentials are the shim's
		}
		out.Header[key] = values
	}
	discovery := rewritten && strings.Count(target, "/") <= 3
	if discovery {
		out.Header.Set("Accept", "application/json") // the legacy discovery documents, rewritten below
	}
	answer, err := s.client.Do(out)
	if err != nil {
		http.Error(w, err.Error(), 502)
		return
	}
	defer answer.Body.Close()
	for key, values := range answer.Header {
		if key == "Content-Length" {
			continue
		}
		w.Header()[key] = values
	}
	query := r.URL.Query()
	if query.Get("watch") == "true" || query.Get("watch") == "1" || strings.Contains(path, "/watch/") {
		w.WriteHeader(answer.StatusCode)
		flusher, _ := w.(http.Flusher)
		if flusher != nil {
			flusher.Flush()
		}
		reader := bufio.NewReaderSize(answer.Body, 1<<16)
		for {
			line, err := reader.ReadBytes('\n')
			if len(line) > 0 {
				if _, werr := io.WriteString(w, toReal.Replace(string(line))); werr != nil {
					return
				}
				if flusher != nil {
					flusher.Flush()
				}
			}
			if err != nil {
				return
			}
		}
	}
	raw, err := io.ReadAll(answer.Body)
	if err != nil {
		http.Error(w, err.Error(), 502)
		return
	}
	text := toReal.Replace(string(raw))
	if path == "/api/v1" && answer.StatusCode == 200 {
		text = withNamespaces(text)
	}
	w.WriteHeader(answer.StatusCode)
	io.WriteString(w, text)
}

// crdSpec is what the shim reads of a CustomResourceDefinition.
type crdSpec struct {
	Group string `json:"group"`
	Scope string `json:"scope"`
	Names struct {
		Plural string `json:"plural"`
	} `json:"names"`
	Versions []struct {
		Name    string `json:"name"`
		Served  bool   `json:"served"`
		Storage bool   `json:"storage"`
	} `json:"versions"`
}

// get reads path from the CRD server as the shim (JSON).
func (s *shim) get(ctx context.Context, path string) (*http.Response, error) {
	request, err := http.NewRequestWithContext(ctx, http.MethodGet, s.upstream+path, nil)
	if err != nil {
		return nil, err
	}
	request.Header.Set("Accept", "application/json")
	return s.client.Do(request)
}

// listCRDs reads the specs of every CRD the server holds.
func (s *shim) listCRDs(ctx context.Context) ([]crdSpec, error) {
	answer, err := s.get(ctx, "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
	if err != nil {
		return nil, err
	}
	defer answer.Body.Close()
	if answer.StatusCode != 200 {
		return nil, fmt.Errorf("%s", answer.Status)
	}
	var list struct {
		Items []struct {
			Spec crdSpec `json:"spec"`
		} `json:"items"`
	}
	if err := json.NewDecoder(answer.Body).Decode(&list); err != nil {
		return nil, err
	}
	specs := make([]crdSpec, len(list.Items))
	for i, item := range list.Items {
		specs[i] = item.Spec
	}
	return specs, nil
}

// groupList answers /apis, which kube-apiserver's aggregator serves and apiextensions-apiserver
// alone does not: every group of the installed CRDs (stand-ins under their real names, the core
// stand-in left out: the core group is /api) and apiextensions.k8s.io itself.
func (s *shim) groupList(w http.ResponseWriter, r *http.Request) {
	crds, err := s.listCRDs(r.Context())
	if err != nil {
		http.Error(w, "apishim: listing CRDs failed: "+err.Error(), 502)
		return
	}
	type version struct {
		GroupVersion string `json:"groupVersion"`
		Version      string `json:"version"`
	}
	type group struct {
		Name             string    `json:"name"`
		Versions         []version `json:"versions"`
		PreferredVersion version   `json:"preferredVersion"`
	}
	byName := map[string]*group{}
	order := []string{"apiextensions.k8s.io"}
	byName["apiextensions.k8s.io"] = &group{Name: "apiextensions.k8s.io", Versions: []version{{"apiextensions.k8s.io/v1", "v1"}}, PreferredVersion: version{"apiextensions.k8s.io/v1", "v1"}}
	for _, crd := range crds {
		name := toReal.Replace(crd.Group)
		if name == "" {
			continue
		}
		g := byName[name]
		if g == nil {
			g = &group{Name: name}
			byName[name] = g
			order = append(order, name)
		}
		for _, v := range crd.Versions {
			if !v.Served {
				continue
			}
			gv := version{name + "/" + v.Name, v.Name}
			known := false
			for _, seen := range g.Versions {
				known = known || seen == gv
			}
			if !known {
				g.Versions = append(g.Versions, gv)
			}
			if v.Storage || g.PreferredVersion.Version == "" {
				g.PreferredVersion = gv
			}
		}
	}
	list := map[string]any{"kind": "APIGroupList", "apiVersion": "v1"}
	groups := []*group{}
	for _, name := range order {
		groups = append(groups, byName[name])
	}
	list["groups"] = groups
	writeJSON(w, 200, list)
}

// nameEvent gives an Event created with a generateName ending in "." (as "job." for the Events of
// job) its name here: kube-apiserver checks a core Event's generateName only as a path segment,
// apiextensions-apiserver checks a custom resource's as a DNS subdomain prefix, which may not end
// in a dot. The name is what kube-apiserver would generate: the prefix and five random characters.
func nameEvent(raw []byte) []byte {
	var event map[string]any
	if json.Unmarshal(raw, &event) != nil {
		return raw
	}
	meta, _ := event["metadata"].(map[string]any)
	prefix, _ := meta["generateName"].(string)
	if meta == nil || meta["name"] != nil || !strings.HasSuffix(prefix, ".") {
		return raw
	}
	const letters = "bcdfghjklmnpqrstvwxz2456789" // apimachinery's utilrand alphabet
	suffix := make([]byte, 5)
	for i := range suffix {
		suffix[i] = letters[rand.IntN(len(letters))]
	}
	meta["name"] = prefix + string(suffix)
	delete(meta, "generateName")
	out, err := json.Marshal(event)
	if err != nil {
		return raw
	}
	return out
}

// withNamespaces adds the Namespaces entry to /api/v1's resource list.
func withNamespaces(list string) string {
	var doc map[string]any
	if json.Unmarshal([]byte(list), &doc) != nil {
		return list
	}
	resources, _ := doc["resources"].([]any)
	doc["resources"] = append(resources, namespacesResource)
	out, err := json.Marshal(doc)
	if err != nil {
		return list
	}
	return string(out)
}

// A garbage collector, as kube-controller-manager's deletes dependents in the background: when an
// object of any namespaced kind the server holds is deleted (its DELETED watch event, so after its
// finalizers), every object whose ownerReferences name its uid is deleted too, and so on down.
// Only with -gc (tests of deletion flows); the scale bench runs without it.
type collector struct {
	shim  *shim
	kinds []string // /apis/GROUP/VERSION/PLURAL of every namespaced kind
}

func (c *collector) get(path string) (*http.Response, error) {
	return c.shim.get(context.Background(), path)
}

func (c *collector) discover() error {
	crds, err := c.shim.listCRDs(context.Background())
	if err != nil {
		return err
	}
	for _, crd := range crds {
		for _, v := range crd.Versions {
			if v.Storage && crd.Scope == "Namespaced" {
				c.kinds = append(c.kinds, "/apis/"+crd.Group+"/"+v.Name+"/"+crd.Names.Plural)
			}
		}
	}
	return nil
}

type object struct {
	Metadata struct {
		Name            string `json:"name"`
		Namespace       string `json:"namespace"`
		UID             string `json:"uid"`
		OwnerReferences []struct {
			UID string `json:"uid"`
		} `json:"ownerReferences"`
	} `json:"metadata"`
}

// watch follows one kind's deletions for as long as the shim runs.
func (c *collector) watch(kind string) {
	for {
		answer, err := c.get(kind + "?watch=true")
		if err != nil || answer.StatusCode != 200 {
			if answer != nil {
				answer.Body.Close()
			}
			time.Sleep(time.Second)
			continue
		}
		reader := bufio.NewReader(answer.Body)
		for {
			line, err := reader.ReadBytes('\n')
			if err != nil {
				break
			}
			var event struct {
				Type   string `json:"type"`
				Object object `json:"object"`
			}
			if json.Unmarshal(line, &event) == nil && event.Type == "DELETED" {
				go c.collect(event.Object.Metadata.UID)
			}
		}
		answer.Body.Close()
	}
}

// collect deletes the dependents of the object with this uid.
func (c *collector) collect(uid string) {
	for _, kind := range c.kinds {
		answer, err := c.get(kind)
		if err != nil {
			continue
		}
		var list struct {
			Items []object `json:"items"`
		}
		json.NewDecoder(answer.Body).Decode(&list)
		answer.Body.Close()
		for _, item := range list.Items {
			for _, owner := range item.Metadata.OwnerReferences {
				if owner.UID != uid {
					continue
				}
				parts := strings.SplitN(strings.TrimPrefix(kind, "/apis/"), "/", 3) // group, version, plural
				path := "/apis/" + parts[0] + "/" + parts[1] + "/namespaces/" + item.Metadata.Namespace + "/" + parts[2] + "/" + item.Metadata.Name
				request, _ := http.NewRequest(http.MethodDelete, c.shim.upstream+path+"?propagationPolicy=Background", nil)
				if answer, err := c.shim.client.Do(request); err == nil {
					answer.Body.Close()
				}
				if c.shim.verbose {
					log.Printf("gc: deleted %s (owner %s gone)", path, uid)
				}
			}
		}
	}
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to serve plain HTTP on")
	upstream := flag.String("upstream", "", "the CRD server's URL (https://127.0.0.1:PORT)")
	caFile := flag.String("ca", "", "the CRD server's CA certificate")
	certFile := flag.String("cert", "", "client certificate (system:masters)")
	keyFile := flag.String("key", "", "its key")
	verbose := flag.Bool("v", false, "log every request")
	collect := flag.Bool("gc", false, "delete the dependents of deleted objects, as Kubernetes' garbage collector does")
	flag.Parse()
	pool := x509.NewCertPool()
	ca, err := os.ReadFile(*caFile)
	if err != nil || !pool.AppendCertsFromPEM(ca) {
		log.Fatalf("apishim: CA %s: %v", *caFile, err)
	}
	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		log.Fatalf("apishim: client certificate: %v", err)
	}
	transport := &http.Transport{
		TLSClientConfig:     &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}},
		ForceAttemptHTTP2:   true,
		MaxIdleConns:        512,
		MaxIdleConnsPerHost: 512,
		IdleConnTimeout:     90 * time.Second,
	}
	handler := &shim{upstream: strings.TrimRight(*upstream, "/"), client: &http.Client{Transport: transport}, verbose: *verbose, known: map[string]bool{}}
	if *collect {
		gc := &collector{shim: handler}
		if err := gc.discover(); err != nil {
			log.Fatalf("apishim: -gc: listing CRDs: %v", err)
		}
		for _, kind := range gc.kinds {
			go gc.watch(kind)
		}
	}
	server := &http.Server{Addr: *listen, Handler: handler}
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	log.Printf("apishim: serving %s for %s", *listen, *upstream)
	log.Fatal(server.ListenAndServe())
}
