// Command workspace_fake serves the Databricks CLI's own fake workspace (libs/testserver, written by
// Databricks for the CLI's acceptance tests) on 127.0.0.1, so that RUNME (through databricks-sdk)
// and `databricks bundle deploy` are both tested against Databricks' model of the REST API.
//
// It prints the server's URL on one line, then serves until its standard input closes. Each
// bearer token gets a workspace of its own.
package main

import (
	"context"
	"fmt"
	"io"
	"log"
	"os"

	"github.com/databricks/cli/libs/testserver"
)

// runT is what testserver.New asks of a *testing.T, for a process that is not a test.
type runT struct {
	ctx      context.Context
	cleanups []func()
}

func (t *runT) Log(args ...any)                 { log.Print(args...) }
func (t *runT) Logf(format string, args ...any) { log.Printf(format, args...) }
func (t *runT) Error(args ...any)               { log.Print(append([]any{"error: "}, args...)...) }
func (t *runT) Errorf(format string, args ...any) {
	log.Printf("error: "+format, args...)
}
func (t *runT) Fatal(args ...any)                 { log.Fatal(args...) }
func (t *runT) Fatalf(format string, args ...any) { log.Fatalf(format, args...) }
func (t *runT) Skip(args ...any)                  { log.Print(args...) }
func (t *runT) Skipf(format string, args ...any)  { log.Printf(format, args...) }
func (t *runT) FailNow()                          { log.Fatal("FailNow") }
func (t *runT) Cleanup(f func())                  { t.cleanups = append(t.cleanups, f) }
func (t *runT) Context() context.Context          { return t.ctx }
func (t *runT) Setenv(key, value string)          { _ = os.Setenv(key, value) }
func (t *runT) TempDir() string {
	dir, err := os.MkdirTemp("", "workspace-fake-")
	if err != nil {
		log.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}
func (t *runT) Helper() {}

func main() {
	t := &runT{ctx: context.Background()}
	server := testserver.New(t)
	testserver.AddDefaultHandlers(server)
	fmt.Println(server.URL)
	_, _ = io.Copy(io.Discard, os.Stdin)
	for i := len(t.cleanups) - 1; i >= 0; i-- {
		t.cleanups[i]()
	}
}
